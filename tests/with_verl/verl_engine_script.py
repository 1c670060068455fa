"""verl's own training engine on CPU: a few PPO steps (compute_log_prob, then update_policy) of a tiny Llama
through ``FSDPEngineWithLMHead`` with ``use_fused_kernels``, on verl's kernel or ours. Run by tests/with_verl/ under
torchrun (gloo) or as one process; writes what each step computed to --out (rank 0).

    python -m torch.distributed.run --nproc_per_node 2 tests/with_verl/verl_engine_script.py --kernel logo --out r.json

verl 0.9.1 has no CPU platform (it falls back to "cuda"): a CPU one is registered before the engine is imported,
with stand-ins for the three torch.cuda memory queries its logging makes. The engine registry lists cuda / npu
only, so the engine class is built directly. verl's own kernel cannot run an FSDP2 model whose lm_head is sharded
on its own (verl issue #5633): ``--wrap none`` builds the engine's module without FSDP and ``--shards 2`` runs two
ranks' data in one process, the reference for that case.
"""
import argparse
import contextlib
import json
import os
import types
from functools import partial

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--kernel", choices=("verl", "logo"), required=True)
parser.add_argument("--backend", choices=("torch", "liger", "triton"), default="torch")
parser.add_argument("--wrap", choices=("fsdp2", "none"), default="fsdp2")
parser.add_argument("--untied", action="store_true", help="lm_head not tied to the embeddings (sharded on its own)")
parser.add_argument("--no-rmpad", action="store_true", help="padded batches instead of verl's remove-padding")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--shards", type=int, default=1, help="one process: run this many ranks' data as one batch")
parser.add_argument("--model-dir", required=True, help="where the tiny model is saved (made by rank 0 if absent)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import set_platform  # noqa: E402


class _CPUDevice(types.ModuleType):
    """torch.cpu, plus zeros for the torch.cuda memory queries verl's logging makes."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "mem_get_info":
            return lambda *a, **k: (0, 1)
        if name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
            return lambda *a, **k: 0
        raise AttributeError(f"the CPU platform of this test has no {name}")


class CPUPlatform(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _CPUDevice("verl_cpu_device")

    def is_available(self): return True
    def current_device(self): return "cpu"
    def device_count(self): return 1
    def set_device(self, i): pass
    def synchronize(self, i=None): pass
    def manual_seed(self, s): torch.manual_seed(s)
    def manual_seed_all(self, s): torch.manual_seed(s)
    def set_allocator_settings(self, s): pass
    def empty_cache(self): pass
    def get_device_capability(self, i=0): return (None, None)
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
    def nvtx_range(self, msg): return contextlib.nullcontext()
    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "CPU"
    def ray_noset_envvars(self): return []
    def is_ipc_supported(self): return False
    def cudart(self): return None


set_platform(CPUPlatform())  # before the engine module is imported: it caches the device name at import
if "RANK" not in os.environ:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

if args.kernel == "logo":  # as in verl's workers: enabled when verl is imported (VERL_USE_EXTERNAL_MODULES)
    from logo_kernels.integrations import verl as logo_verl

    assert os.environ.get("VERL_USE_EXTERNAL_MODULES") == "logo_kernels.integrations.verl_autoenable"
    assert logo_verl.is_enabled(), "VERL_USE_EXTERNAL_MODULES did not enable the drop-in"


from tensordict import TensorDict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

V, D = 1000, 64
RMPAD = not args.no_rmpad
model_dir = os.path.join(args.model_dir, "untied" if args.untied else "tied")
if rank == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=not args.untied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).save_pretrained(model_dir + ".tmp")
    os.replace(model_dir + ".tmp", model_dir)
dist.barrier()

model_config = HFModelConfig(path=model_dir, load_tokenizer=False, use_remove_padding=RMPAD, use_fused_kernels=True,
                             fused_kernel_options={"impl_backend": args.backend}, enable_gradient_checkpointing=False,
                             override_config={"attn_implementation": "sdpa"})
fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                                 micro_batch_size_per_gpu=2, infer_micro_batch_size_per_gpu=2, mixed_precision=fp32,
                                 model_dtype="fp32", use_fused_kernels=True, use_remove_padding=RMPAD)
engine = FSDPEngineWithLMHead(model_config=model_config, engine_config=engine_config,
                              optimizer_config=FSDPOptimizerConfig(lr=2e-3, total_training_steps=args.steps),
                              checkpoint_config=CheckpointConfig())
if args.wrap == "none":  # the engine's own module build and monkey patch, without the FSDP wrapper
    engine.module = engine._build_module()
    engine.pass_packed_cu_seqlens = False
    engine.optimizer = engine._build_optimizer(engine.module)
    engine.lr_scheduler = engine._build_lr_scheduler(engine.optimizer)
    engine._autocast_dtype = torch.float32
else:
    engine.initialize()

# PPO batches like the trainer's (prompts left-padded, responses right-padded) from shards of 4 sequences: rank r
# of a world of W runs shard r; one process with --shards K runs shards 0..K-1 together (the same global batch)
B, P, R = 4, 6, 5
shards = list(range(args.shards)) if world == 1 else [rank]
generators = {s: torch.Generator().manual_seed(1234 + s) for s in shards}


def shard_tensors(s):
    g = generators[s]
    prompt_lens, response_lens = [6, 4, 5, 3], [5, 3, 4, 2]
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    attention = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        prompts[i, P - prompt_lens[i]:] = torch.randint(3, V, (prompt_lens[i],), generator=g)
        responses[i, :response_lens[i]] = torch.randint(3, V, (response_lens[i],), generator=g)
        attention[i, P - prompt_lens[i]:P + response_lens[i]] = 1
    return prompts, responses, attention


prompts, responses, attention = (torch.cat(parts) for parts in zip(*(shard_tensors(s) for s in shards)))
rows = prompts.shape[0]
global_rows = B * max(world, args.shards)
input_ids = torch.cat([prompts, responses], 1)
position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
response_mask = attention[:, P:].clone()
temperature = 0.7
actor_config = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=global_rows,
                           ppo_micro_batch_size_per_gpu=2, entropy_coeff=0.01, use_kl_loss=False)


def batch(**extra):
    td = TensorDict({"prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention,
                     "position_ids": position_ids, "response_mask": response_mask, **extra}, batch_size=[rows])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=temperature, use_remove_padding=RMPAD, use_fused_kernels=True,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
    return td


def gathered(x: torch.Tensor) -> list:
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).tolist()


def metric(value) -> list:
    """verl's metrics are floats, lists or its Metric aggregator (values per micro-batch), every rank's."""
    values = getattr(value, "values", value)
    values = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])]
    every = [None] * world
    dist.all_gather_object(every, values)
    return [x for part in every for x in part]


steps = []
for step in range(args.steps):
    td = batch()
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    with engine.eval_mode():
        output = engine.infer_batch(td, loss_function=None)["model_output"]
    log_probs = no_padding_2_padding(output["log_probs"], td).float() * response_mask
    entropy = no_padding_2_padding(output["entropy"], td).float() * response_mask

    advantages = torch.cat([torch.randn(B, R, generator=generators[s]) for s in shards]) * response_mask
    td = batch(old_log_probs=log_probs.detach(), advantages=advantages)
    tu.assign_non_tensor(td, calculate_entropy=True, global_batch_size=global_rows, compute_loss=True)
    with engine.train_mode():
        result = engine.train_batch(td, loss_function=partial(ppo_loss, config=actor_config))
    steps.append({"log_probs": gathered(log_probs), "entropy": gathered(entropy),
                  "loss": metric([float(x) for x in result["loss"]]),
                  "grad_norm": metric(result["metrics"]["grad_norm"])[:1],
                  "pg_loss": metric(result["metrics"]["actor/pg_loss"]),
                  "entropy_loss": metric(result["metrics"]["actor/entropy_loss"])})

import verl.utils.experimental.torch_functional as torch_functional  # noqa: E402
import verl.utils.kernel.linear_cross_entropy as linear_cross_entropy  # noqa: E402

kernels = [torch_functional.FusedLinearForPPO.__module__ + "." + torch_functional.FusedLinearForPPO.__qualname__,
           linear_cross_entropy.linear_cross_entropy.__module__]
parameters = {}
for name, p in engine.module.named_parameters():
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    parameters[name.replace("_fsdp_wrapped_module.", "")] = full.detach().double().reshape(-1).tolist()
if rank == 0:
    with open(args.out + ".tmp", "w") as f:
        json.dump({"world": world, "steps": steps, "parameters": parameters,
                   "forward": getattr(type(engine.module).forward, "__wrapped__", type(engine.module).forward).__qualname__,
                   "kernels": kernels}, f)
    os.replace(args.out + ".tmp", args.out)
dist.barrier()
dist.destroy_process_group()
