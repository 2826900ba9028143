"""Attention backends side by side: padded SDPA against packed varlen kernels, one run, one table.

The same real cells (kang18, most with 510-1,100 expressed genes; pbmc68k tiled where kang18 is absent) are
trained on for the same steps with each backend of ``GeneTransformer(attention=...)``, from the
same initial weights, in minibatches of random order (much padding) and length-bucketed
(little). Printed per backend: cells/s, real tokens/s, model FLOP utilisation against a large
matmul measured in the same run (bf16 on CUDA, fp32 on CPU), and the largest difference of the
first minibatch's loss from SDPA's.

On CUDA (bf16 autocast): ``sdpa``, ``varlen`` (torch's ``varlen_attn``) and ``flash`` (flash-attn,
when installed). On CPU the packed kernels do not exist; ``reference`` then runs the packed code
path with one SDPA call per cell, to show that packing is correct, not to time it.

With ``--profile STEPS``: where a training step's time goes, per phase (tokenize, mask, forward,
backward, optimizer), for each backend and the BERT baseline: host and device milliseconds,
operators, kernel launches and host reads (which make the host wait for the GPU).

Usage: python benchmarks/attention.py [--cells 1024] [--batch-size 32] [--d-model 256] [--layers 4]
[--profile STEPS]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F

import sctransformer as sct
from sctransformer.data import (
    EpochSeededRandomSampler,
    LengthBucketedSampler,
    expressed_per_cell,
    to_torch_csr,
)
from sctransformer.module import _attention, sdpa_varlen_reference, select_attention
from sctransformer.train import mask_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import expression_head_flops, make_bert, train_flops

warnings.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_cells(n_cells: int) -> ad.AnnData:
    path = DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad"
    if path.exists():
        return ad.read_h5ad(path)[:n_cells].copy()
    pbmc = sct.datasets.pbmc68k()
    pbmc.X = pbmc.layers.pop("counts")
    return ad.concat([pbmc] * (n_cells // pbmc.n_obs + 1))[:n_cells].copy()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, repeat: int = 20) -> float:
    """Measured FLOP/s of a large matrix product in ``dtype`` on ``device``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS training steps per phase"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        backends = ["sdpa", "varlen"] + (["flash"] if importlib.util.find_spec("flash_attn") else [])
    else:
        # the packed code path with a per-cell SDPA kernel, allowed on CPU (a check, not a timing)
        kernels, unusable = dict(_attention.VARLEN_KERNELS), _attention.attention_unusable
        _attention.VARLEN_KERNELS["varlen"] = sdpa_varlen_reference
        _attention.attention_unusable = lambda backend, x, head_dim: None
        backends = ["sdpa", "varlen"]
        args.cells, args.d_model, args.layers, args.heads = min(args.cells, 128), 64, 2, 4
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32, n=8192 if cuda else 4096)

    adata = load_cells(args.cells)
    sct.setup_anndata(adata)
    model = sct.GeneTransformer(
        adata, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_length=args.max_length
    )
    initial = {k: v.clone() for k, v in model.module.state_dict().items()}
    column_to_gene = torch.as_tensor(model._column_to_gene(adata), device=device)
    counts = adata.X.tocsr()
    lengths = np.minimum(expressed_per_cell(adata, layer=None), args.max_length)
    bs = args.batch_size
    none = torch.zeros(bs, 0, dtype=torch.long, device=device)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    if cuda:
        print(f"# {torch.cuda.get_device_name()}, measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    else:
        print(f"# CPU: fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; packed kernels need CUDA (reference only)")
    print(f"# {args.cells} cells, d_model={args.d_model}, {args.layers} layers, {args.heads} heads")
    print("| backend | minibatches | cells/s | real tokens/s | model FLOP utilisation | loss vs sdpa |")
    print("|---|---|---|---|---|---|")
    for order_name, sampler in (
        ("random", EpochSeededRandomSampler(adata.n_obs, seed=0)),
        ("length-bucketed", LengthBucketedSampler(lengths, bs, seed=0)),
    ):
        order = np.array(list(sampler))
        batches = [np.sort(order[i : i + bs]) for i in range(0, len(order) - bs + 1, bs)]
        first_loss = {}
        for backend in backends:
            module = model.module.to(device)
            module.load_state_dict(initial)
            module.train()
            module.attention = backend
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
            generator = torch.Generator(device=device).manual_seed(0)
            lengths = []  # real tokens per cell of each timed step, read after the clock stops
            for step, batch in enumerate([batches[0], *batches]):  # the first is a warm-up
                if step == 1:
                    synchronize(device)
                    start = time.perf_counter()
                tokens = module.tokenize(to_torch_csr(counts[batch]).to(device), column_to_gene)
                value_mask, _ = mask_tokens(
                    tokens, none, gene_mask_prob=0.15, phenotype_mask_prob=0.0, generator=generator
                )
                with autocast:
                    hidden = module.encode(tokens, none, value_mask)
                    loss = module.loss(hidden, tokens, value_mask, none, none.bool(), []).total
                if step == 0:
                    first_loss[backend] = float(loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step > 0:
                    lengths.append(tokens.is_token.sum(1))
            synchronize(device)
            seconds = time.perf_counter() - start
            real, flops = step_work(
                lengths,
                args,
                n_prefix=module.n_prefix,
                head_flops=expression_head_flops(args.d_model, module.n_bins, module.cell_expression_loss),
            )
            print(
                f"| {backend if cuda else backend.replace('varlen', 'reference')} | {order_name} | {len(batches) * bs / seconds:,.1f} | {real / seconds:,.0f} | "
                f"{flops / seconds / peak:.1%} | {abs(first_loss[backend] - first_loss['sdpa']):.2e} |"
            )
        bert_row(model, args, batches, counts, column_to_gene, order_name, autocast, peak)
        if args.profile and order_name == "random":
            profiled = (batches, backends if cuda else ["sdpa"])
    if args.profile:
        module.load_state_dict(initial)
        profile_steps(model, args, profiled[0], counts, column_to_gene, profiled[1], autocast, device)
    model.module.attention = "auto"
    if not cuda:  # the end-to-end run uses the real kernel choice
        _attention.VARLEN_KERNELS.update(kernels)
        _attention.attention_unusable = unusable
    end_to_end(model, adata, initial, bs, args.heads, device)
    if cuda:
        sdpa_length_cost()


def sdpa_length_cost(n_cells: int = 64, heads: int = 8, d_head: int = 32) -> None:
    """Forward + backward of masked SDPA (bf16) over 29 new padded lengths, then the same again, per backend.

    cuDNN's attention builds a plan per sequence length: the first pass pays it, the second does not.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths = list(range(520, 1100, 20))
    generator = torch.Generator(device="cuda").manual_seed(0)

    def call(length: int) -> None:
        q, k, v = (
            torch.randn(
                n_cells, heads, length, d_head, device="cuda", dtype=torch.bfloat16, generator=generator
            ).requires_grad_()
            for _ in range(3)
        )
        mask = torch.arange(length, device="cuda") < length - torch.arange(n_cells, device="cuda")[:, None]
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).sum().backward()

    print(f"\n# masked SDPA, {n_cells} cells x {heads} heads x {d_head}, bf16, forward + backward")
    print(f"| SDPA kernels | first pass over {len(lengths)} new lengths, ms/call | second pass, ms/call |")
    print("|---|---|---|")
    choices = {
        "torch's choice (cuDNN on Hopper)": nullcontext(),
        "memory-efficient only": sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
    }
    for name, kernels in choices.items():
        passes = []
        with kernels:
            for _ in range(2):
                synchronize(torch.device("cuda"))
                start = time.perf_counter()
                for length in lengths:
                    call(length)
                synchronize(torch.device("cuda"))
                passes.append((time.perf_counter() - start) / len(lengths) * 1e3)
        print(f"| {name} | {passes[0]:.1f} | {passes[1]:.1f} |")


# metadata-only operators: no kernel behind them
_VIEWS = {
    "aten::view",
    "aten::as_strided",
    "aten::empty",
    "aten::empty_strided",
    "aten::resolve_conj",
    "aten::detach",
    "aten::resize_",
    "aten::_reshape_alias",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::t",
    "aten::transpose",
    "aten::expand",
    "aten::permute",
    "aten::slice",
    "aten::select",
    "aten::alias",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::lift_fresh",
    "aten::as_strided_",
}
# operators that make the host wait for the device (on CUDA; on CPU they only mark where it would)
_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero"}


def profile_phases(step, n_steps: int, device: torch.device) -> list[tuple[str, float, float, int, int, int]]:
    """Per phase of ``step`` (marked with ``record_function("phase:<name>")``), per step: host
    milliseconds, device milliseconds, operators run, kernels launched and host reads."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        synchronize(device)
    events = list(prof.events())
    phases = sorted((e for e in events if e.name.startswith("phase:")), key=lambda e: e.time_range.start)
    totals: dict[str, list[float]] = {}
    for phase in phases:
        totals.setdefault(phase.name[6:], [0.0, 0.0, 0, 0, 0])[0] += phase.time_range.elapsed_us()
    # host events only: a kernel's own event runs on the device's clock, and its time is also
    # the device time of the operator that launched it
    for event in (e for e in events if e.device_type == DeviceType.CPU):
        inside = [p for p in phases if p.time_range.start <= event.time_range.start < p.time_range.end]
        if not inside or event.name.startswith("phase:"):
            continue
        total = totals[inside[-1].name[6:]]
        total[1] += event.self_device_time_total
        if event.name.startswith("aten::") and not event.cpu_children and event.name not in _VIEWS:
            total[2] += 1
        total[3] += "LaunchKernel" in event.name
        total[4] += event.name in _HOST_READS
    return [
        (name, t[0] / 1e3 / n_steps, t[1] / 1e3 / n_steps, t[2] // n_steps, t[3] // n_steps, t[4] // n_steps)
        for name, t in totals.items()
    ]


def print_profile(name: str, step, n_steps: int, device: torch.device, bs: int) -> None:
    """One model's profile table, after its unprofiled step time."""
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / n_steps
    rows = profile_phases(step, n_steps, device)
    cuda = device.type == "cuda"
    print(f"\n# {name}: {seconds * 1e3:.1f} ms per step of {bs} cells without the profiler")
    print("| phase | host ms | device ms | operators | kernel launches | host reads |")
    print("|---|---|---|---|---|---|")
    total = ("all", *(sum(row[i] for row in rows) for i in range(1, 6)))
    for phase, host, busy, ops, launches, reads in [*rows, total]:
        device_ms, launched = (f"{busy:.1f}", str(launches)) if cuda else ("", "")
        print(f"| {phase} | {host:.1f} | {device_ms} | {ops} | {launched} | {reads} |")


def profile_steps(model, args, batches, counts, column_to_gene, backends, autocast, device) -> None:
    """Where a training step's time goes, per backend and for the BERT baseline (``--profile``)."""
    from torch.profiler import record_function

    module, bs = model.module, args.batch_size
    none = torch.zeros(bs, 0, dtype=torch.long, device=device)
    cells = to_torch_csr(counts[batches[0]]).to(device)
    for backend in backends:
        module.attention = backend
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

        def step(optimizer=optimizer) -> None:
            with record_function("phase:tokenize"):
                tokens = module.tokenize(cells, column_to_gene)
            with record_function("phase:mask"):
                value_mask, _ = mask_tokens(tokens, none, gene_mask_prob=0.15, phenotype_mask_prob=0.0)
            with record_function("phase:forward"), autocast:
                hidden = module.encode(tokens, none, value_mask)
                loss = module.loss(hidden, tokens, value_mask, none, none.bool(), []).total
            with record_function("phase:backward"):
                optimizer.zero_grad()
                loss.backward()
            with record_function("phase:optimizer"):
                optimizer.step()

        print_profile(f"sctransformer, attention={backend!r}", step, args.profile, device, bs)
    bert = make_bert(args.d_model, args.layers, len(model.vocabulary_), args.max_length, device, args.heads)
    if bert is not None:
        tokens = module.tokenize(cells, column_to_gene)
        print_profile(
            "Hugging Face BertModel, padded", lambda: bert.step(tokens, autocast), args.profile, device, bs
        )


def step_work(lengths: list[torch.Tensor], args, *, n_prefix: int, head_flops: float) -> tuple[float, float]:
    """Real tokens and model FLOPs of the timed steps, from each step's real tokens per cell."""
    real = float(sum(float(step.sum()) for step in lengths))
    flops = sum(
        train_flops(
            step,
            d_model=args.d_model,
            d_ff=4 * args.d_model,
            n_layers=args.layers,
            n_prefix=n_prefix,
            head_flops=head_flops,
        )
        for step in lengths
    )
    return real, flops


def bert_row(model, args, batches, counts, column_to_gene, order_name, autocast, peak) -> None:
    """The same minibatches through a Hugging Face ``BertModel`` of the same size, padded, bf16 autocast."""
    module = model.module
    bert = make_bert(
        args.d_model, args.layers, len(model.vocabulary_), args.max_length, module.cls.device, args.heads
    )
    if bert is None:
        print(f"| hf-bert (padded) | {order_name} | transformers is not installed | | | |")
        return
    lengths = []
    for step, batch in enumerate([batches[0], *batches]):
        tokens = module.tokenize(to_torch_csr(counts[batch]).to(module.cls.device), column_to_gene)
        if step == 1:
            synchronize(module.cls.device)
            start = time.perf_counter()
        bert.step(tokens, autocast)
        if step > 0:
            lengths.append(tokens.is_token.sum(1))
    synchronize(module.cls.device)
    seconds = time.perf_counter() - start
    # BERT's head: Linear(d, 16) on the 15% masked tokens
    real, flops = step_work(lengths, args, n_prefix=0, head_flops=0.15 * 2 * args.d_model * 16)
    print(
        f"| hf-bert (padded) | {order_name} | {len(batches) * args.batch_size / seconds:,.1f} | "
        f"{real / seconds:,.0f} | {flops / seconds / peak:.1%} | |"
    )


def end_to_end(
    model: sct.GeneTransformer, adata: ad.AnnData, initial: dict, bs: int, n_heads: int, device: torch.device
) -> None:
    """What a user runs: ``train()`` in bf16 with ``attention="auto"``, and embedding, timed."""
    model.module.load_state_dict(initial)
    d_model = model.module.cls.shape[-1]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        chosen = select_attention("auto", torch.zeros(1, 1, d_model, device=device), d_model // n_heads)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n# end to end on {name}: attention='auto' runs {chosen!r} in bf16")
    print("| step | cells | seconds | cells/s |")
    print("|---|---|---|---|")
    for bucketing in (False, True):
        start = time.perf_counter()
        model.train(
            max_epochs=2,
            batch_size=bs,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed",
            length_bucketing=bucketing,
            calibrate=False,
            train_size=1.0,
            enable_progress_bar=False,
            logger=False,
        )
        seconds = time.perf_counter() - start
        name = f"train(), 2 epochs, length_bucketing={bucketing}"
        print(f"| {name} | {2 * adata.n_obs} | {seconds:.1f} | {2 * adata.n_obs / seconds:,.0f} |")
    for _ in range(2):  # the first call includes CUDA warm-up
        start = time.perf_counter()
        model.get_latent_representation(adata, batch_size=256)
        seconds = time.perf_counter() - start
    print(f"| get_latent_representation | {adata.n_obs} | {seconds:.1f} | {adata.n_obs / seconds:,.0f} |")


if __name__ == "__main__":
    main()
