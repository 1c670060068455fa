"""Every local link of the given Markdown files (and of the .md files under given directories) resolves:
``[text](path)`` and ``[text](path#anchor)`` relative to the file, checked for existence; web links are not
fetched (no network here). Prints each broken link as ``file:line: target`` and exits 1 if there is one."""
import os
import re
import sys

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files(paths):
    for path in paths:
        if os.path.isdir(path):
            for base, _, names in os.walk(path):
                yield from (os.path.join(base, n) for n in sorted(names) if n.endswith(".md"))
        elif os.path.exists(path):
            yield path


def broken_links(path):
    in_code = False
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue
                local = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
                if not os.path.exists(local):
                    yield number, target


def main(paths) -> int:
    bad = [(path, number, target) for path in markdown_files(paths) for number, target in broken_links(path)]
    for path, number, target in bad:
        print(f"{path}:{number}: broken link {target}")
    checked = len(list(markdown_files(paths)))
    print(f"check_links: {checked} file(s), {len(bad)} broken link(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["README.md", "docs"]))
