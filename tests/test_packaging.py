"""The package as users meet it: one version, the environment report, the link checker CI runs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_version_for_both_packages_and_the_distribution_name():
    import logo
    import logo_kernels

    assert logo.__version__ == logo_kernels.__version__
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'name = "logo-kernels"' in text and 'attr = "logo_kernels._version.__version__"' in text
    assert '"torch>=2.11"' in text and "torch==" not in text.split("[project.optional-dependencies]")[0]


def test_the_environment_report_names_versions_and_backends():
    text = subprocess.run([sys.executable, "-m", "logo_kernels"], check=True, capture_output=True, text=True).stdout
    for key in ("python", "torch", "backend cpp", "backend triton", "C++ extension", "transformers", "deepspeed"):
        assert f"  {key}" in text, text
    data = json.loads(subprocess.run([sys.executable, "-m", "logo_kernels", "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    assert set(data["backends"]) == {"torch", "cpp", "triton"} and data["torch"]
    assert data["auto picks"]["cpu"] in ("cpp", "torch") and "numpy" in data["peers"]


def test_the_link_checker_finds_a_broken_local_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    (tmp_path / "page.md").write_text("[ok](there.md#a) [web](https://example.org) [bad](missing.md)\n"
                                      "```\n[in code](nowhere.md)\n```\n")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "check_links.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "page.md:1: broken link missing.md" in run.stdout
    assert "nowhere.md" not in run.stdout and "there.md" not in run.stdout
