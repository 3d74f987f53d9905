"""Training-step time of the MSA model: the fused ``mscmat_scores`` op vs its einsum reference vs the published
pair-materialising computation (``msa.mscmat.mscmat_pairs_ref``), at tiny and published sizes.

    python benchmarks/bench_train_step.py                               # tiny + published, B = 32 and 128
    python benchmarks/bench_train_step.py --sizes tiny --batches 32     # a smoke run
    python benchmarks/bench_train_step.py --out DIR                     # where the JSON rows and the table go
    python benchmarks/bench_train_step.py --sizes published --batches 128 --providers fused --precision bf16 \
        --max-published-step-batch 128                                  # the GPU target: MSCMAT share of a step

Two modes per (size, batch, provider), each forward + backward of the paper-preset loss:
- ``mscmat``: the MSCMAT part alone (scores of all B x B pairs + alignment and consistency losses, backward into the
  MSCMAT weights and the encoder outputs, which are fixed leaf tensors here);
- ``step``: the whole training step (image and text encoders included), which is what a user waits for.
The published size is ResNet-50 + a randomly initialised BERT-base (768 wide, 12 layers) at 224 px, 31 tokens,
D = 768, 12 heads. Built for a shared machine: after a warm-up call, the providers of a case take turns round by round
(the order rotates), each provider's time is divided by the fused op's of the same round, and the table gives
median [min-max] over the rounds with the 1-minute load average before and after the case; a ratio whose spread
crosses 1.0 is flagged "noisy". A case whose pair tensors would exceed ``--pairs-budget-gib`` is skipped and reported
as such. Ratios are computed within this one run on this one device. With both modes measured, the table ends with
the MSCMAT part's share of the whole step per (size, batch, provider); ``--precision bf16`` runs both under autocast,
as ``msa-train --precision bf16`` trains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mscmat import environment, load_average, peak_memory, spread, synchronize  # noqa: E402

from msa.configs import BERT_BASE, TINY_BERT, get_config  # noqa: E402
from msa.losses import msa_loss  # noqa: E402
from msa.model import ImageFeatures, MSAModel, MSAOutput, TextFeatures  # noqa: E402
from msa.mscmat import mscmat_pairs_ref  # noqa: E402
from msa.ops import empty_cache  # noqa: E402
from msa.training.config import PRECISIONS  # noqa: E402
from msa.training.loop import in_float32  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("fused", "reference", "pairs")
# The batches are token ids drawn here (bert-base-uncased's [CLS] 101 and [SEP] 102 around random words), so the
# models need the [SEP] id (word_mask) and no tokenizer files, which a bare GPU machine does not have.
TOKEN_IDS_ONLY = SimpleNamespace(sep_token_id=102)
SIZES = {
    "tiny": {"name": "msa-tiny", "overrides": {"text_config": TINY_BERT}},
    # The published architecture without its pretrained weights (which would need a download).
    "published": {
        "name": "msa-resnet50-bert",
        "overrides": {
            "image_pretrained": False,
            "text_pretrained": False,
            "text_config": BERT_BASE,
        },
    },
}


@dataclass
class Row:
    size: str
    batch: int
    mode: str
    provider: str
    median_ms: float | None
    peak_extra_mib: float | None
    max_abs_error: float | None
    note: str = ""
    environment: dict = field(default_factory=dict)
    ms_spread: tuple | None = None  # (min, median, max) over the rounds
    vs_fused: tuple | None = None  # this provider's time / the fused op's, per round: (min, median, max)
    load_average: tuple | None = None  # 1-minute load average before and after the case


def make_batch(model: MSAModel, batch: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    length = model.config.max_length
    input_ids = torch.randint(1000, 29000, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    lengths = torch.randint(8, length, (batch,), generator=generator)
    for row, valid in enumerate(lengths.tolist()):  # [CLS] words [SEP] padding, like real captions
        input_ids[row, 0], input_ids[row, valid - 1] = 101, 102
        input_ids[row, valid:] = 0
        attention_mask[row, valid:] = 0
    return images.to(device), input_ids.to(device), attention_mask.to(device)


def scores_of(model: MSAModel, provider: str, images: ImageFeatures, texts: TextFeatures) -> MSAOutput:
    if provider == "pairs":
        scores = mscmat_pairs_ref(model.mscmat, images.scale_features, texts.word_tokens, texts.text_global)
        return MSAOutput(images.embeds, texts.embeds, scores, model.current_logit_scale())
    model.mscmat.backend = "auto" if provider == "fused" else "reference"
    return model.forward_features(images, texts)


def pairs_bytes(model: MSAModel, batch: int) -> int:
    """Pair tensors the published computation keeps alive for backward: per scale about 6 [B^2, L, D] float32
    tensors (repeated words, keys, values, attention input/output grads) plus the shared repeated words."""
    length, dim = model.config.max_length - 1, model.config.embed_dim
    return (6 * len(model.mscmat.scales) + 1) * batch * batch * length * dim * 4


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def mscmat_call(model: MSAModel, provider: str, images: ImageFeatures, texts: TextFeatures, precision: str):
    def call():
        model.zero_grad(set_to_none=True)
        with autocast(images.embeds.device, precision):
            output = scores_of(model, provider, images, texts)
        loss = msa_loss(in_float32(output), preset="paper")
        loss.total.backward()
        return torch.stack(output.scale_scores).detach()

    return call


def step_call(model: MSAModel, provider: str, batch, precision: str):
    images, input_ids, attention_mask = batch

    def call():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks for every provider, so that their scores compare
        with autocast(images.device, precision):
            image_features = model.encode_image(images)
            output = scores_of(model, provider, image_features, model.encode_text(input_ids, attention_mask))
        msa_loss(in_float32(output), preset="paper").total.backward()
        return torch.stack(output.scale_scores).detach()

    return call


def leaf_features(model: MSAModel, batch) -> tuple[ImageFeatures, TextFeatures]:
    """The encoders' outputs as leaf tensors that require grad (the MSCMAT mode times only what follows them)."""
    with torch.no_grad():
        images = model.encode_image(batch[0])
        texts = model.encode_text(batch[1], batch[2])

    def leaf(tensor):
        return tensor.detach().clone().requires_grad_()

    return (
        ImageFeatures(leaf(images.embeds), [leaf(t) for t in images.scale_features]),
        TextFeatures(leaf(texts.embeds), leaf(texts.word_tokens), leaf(texts.text_global), texts.word_mask),
    )


def timed(call, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def bench(args, device: torch.device, env: dict, on_case=lambda rows: None) -> list[Row]:
    """The rows of every case; ``on_case(rows so far)`` after each, so that a run cut by a time limit (the device
    check's phases) keeps the cases it finished."""
    rows: list[Row] = []
    budget = args.pairs_budget_gib * 2**30
    cases = [(size, batch, mode) for size in args.sizes for batch in args.batches for mode in args.modes]
    progress = tqdm(total=len(cases), desc="train-step benchmark", unit="case")
    models: dict[str, MSAModel] = {}
    for size, batch_size, mode in cases:
        progress.set_postfix_str(f"{size} B={batch_size} {mode}")
        if size not in models:
            torch.manual_seed(0)
            spec = SIZES[size]
            models[size] = MSAModel(get_config(spec["name"], **spec["overrides"]), tokenizer=TOKEN_IDS_ONLY)
            models[size].to(device).train()
        model = models[size]
        batch = make_batch(model, batch_size, device)
        features = leaf_features(model, batch) if mode == "mscmat" else None
        calls, results = {}, {}
        for provider in args.providers:
            if provider == "pairs" and pairs_bytes(model, batch_size) > budget:
                note = f"skipped: pair tensors ~{pairs_bytes(model, batch_size) / 2**30:.0f} GiB > budget"
            elif mode == "step" and size == "published" and batch_size > args.max_published_step_batch:
                note = f"skipped: whole published-size step above B={args.max_published_step_batch}"
            else:
                note = ""
                calls[provider] = (
                    mscmat_call(model, provider, *features, args.precision)
                    if mode == "mscmat"
                    else step_call(model, provider, batch, args.precision)
                )
            results[provider] = {"note": note, "times": []}
        for provider, call in calls.items():
            empty_cache()  # blocks the CPU kernel holds from earlier calls would hide this call's allocations
            with peak_memory(device) as peak:
                results[provider]["scores"] = call()  # also the warm-up
            results[provider]["peak"] = None if peak[0] is None else peak[0] / 2**20
        # Providers take turns (the order rotates each round), so that a load change on this (shared) machine hits
        # them alike; ratios are taken per round.
        loads, order = [load_average()], list(calls)
        for repeat in range(args.repeats):
            shift = repeat % len(order)
            for provider in order[shift:] + order[:shift]:
                results[provider]["times"].append(timed(calls[provider], device))
        loads.append(load_average())
        expected = None
        for provider in args.providers:
            result = results[provider]
            if provider not in calls:
                rows.append(Row(size, batch_size, mode, provider, None, None, None, result["note"], env))
                continue
            scores = result["scores"].double()
            expected = scores if expected is None else expected
            error = (scores - expected).abs().max().item()
            times = result["times"]
            fused_times = results["fused"]["times"] if "fused" in calls else None
            ratios = [t / f for t, f in zip(times, fused_times)] if fused_times and provider != "fused" else []
            rows.append(Row(size, batch_size, mode, provider, statistics.median(times) * 1e3, result["peak"], error, "",
                            env, spread([t * 1e3 for t in times]), spread(ratios), tuple(loads)))  # fmt: skip
        on_case(rows)
        progress.update()
    progress.close()
    return rows


def markdown(rows: list[Row], env: dict) -> str:
    lines = [
        f"Training step (forward + backward, paper loss) on {env['device']} ({env['threads']} threads), torch "
        f"{env['torch']}, git {env['git_sha']}, precision {env['precision']}. Error: max |scores - first provider's "
        "scores|.",
        "",
        "| size | B | mode | provider | ms: median [min-max] | vs fused, per round | peak extra MiB | max abs err | "
        "load avg | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r.ms_spread[1]:.1f} [{r.ms_spread[0]:.1f}-{r.ms_spread[2]:.1f}]" if r.ms_spread else "-"
        ratio = ""
        if r.vs_fused:
            low, median, high = r.vs_fused
            ratio = f"{median:.2f}x [{low:.2f}x-{high:.2f}x]" + (" (noisy)" if low < 1 < high else "")
        mib = f"{r.peak_extra_mib:.0f}" if r.peak_extra_mib is not None else "-"
        err = f"{r.max_abs_error:.1e}" if r.max_abs_error is not None else "-"
        load = "-" if not r.load_average or None in r.load_average else "{:.1f}-{:.1f}".format(*r.load_average)
        lines.append(
            f"| {r.size} | {r.batch} | {r.mode} | {r.provider} | {ms} | {ratio} | {mib} | {err} | {load} | {r.note} |"
        )
    shares = mscmat_shares(rows)
    if shares:
        lines += ["", "| size | B | provider | MSCMAT part / whole step (medians) |", "|---|---|---|---:|"]
        lines += [
            f"| {size} | {batch} | {provider} | {share:.1%} |" for (size, batch, provider), share in shares.items()
        ]
    return "\n".join(lines) + "\n"


def mscmat_shares(rows: list[Row]) -> dict[tuple, float]:
    """The MSCMAT part's median time over the whole step's, per (size, batch, provider) with both measured."""
    medians = {(r.size, r.batch, r.provider, r.mode): r.median_ms for r in rows if r.median_ms is not None}
    return {
        (size, batch, provider): ms / medians[size, batch, provider, "step"]
        for (size, batch, provider, mode), ms in medians.items()
        if mode == "mscmat" and (size, batch, provider, "step") in medians
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,published", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--batches", default="32,128", help="comma list of batch sizes")
    parser.add_argument("--modes", default="mscmat,step", help="comma list of: mscmat, step")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of: " + ", ".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case (providers take turns)")
    parser.add_argument("--pairs-budget-gib", type=float, default=8.0, help="skip the pairs provider above this")
    parser.add_argument(
        "--max-published-step-batch", type=int, default=32, help="largest B for the whole published-size step"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast dtype of both modes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="folder for JSON and markdown")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    args.providers = args.providers.split(",")
    for value, allowed, what in ((args.sizes, SIZES, "size"), (args.modes, ("mscmat", "step"), "mode")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"unknown {what} {bad}")
    if [p for p in args.providers if p not in PROVIDERS]:
        parser.error(f"providers must be among {PROVIDERS}")
    device = torch.device(args.device)
    env = environment(device) | {"precision": args.precision}
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[Row]) -> str:
        table = markdown(rows, env)
        (args.out / "bench_train_step.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
        (args.out / "bench_train_step.md").write_text(table)
        return table

    print(write(bench(args, device, env, on_case=write)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
