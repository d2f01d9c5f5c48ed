"""Benchmark 4: the distilgpt2 architecture on one GPU, engine vs Hugging Face Trainer (no network needed).

    python -m engine.benchmarks.gpu [--steps 30] [--json PATH]
    python -m engine.benchmarks.gpu --smoke      # the same plumbing on CPU: tiny model, fp32, no compile, 3 steps

The model is GPT2Config(n_layer=6) (distilgpt2's shape: 768 wide, 12 heads, vocab 50257) with random
weights, saved once to a temporary folder with a byte-level BPE tokenizer trained on the text
(tinyshakespeare from ../shared/data when present, else recipes/data/quickstart.txt), so LoRA can
be applied as to a pretrained model. Sequence length 512. Two settings, each through the engine
(`engine.bench`, a fresh process) and through Trainer (a fresh process):

(a) the original design's: batch 4 x accumulation 4, fp16, gradient checkpointing, LoRA r=16 on c_attn;
(b) throughput: full fine-tuning, bf16; the engine with train.auto_batch_size and train.compile, Trainer at
    micro-batch 32 (its best measured: auto_find_batch_size chose worse).

Trainer runs eager and compiled (torch_compile) in each setting; the faster counts for the targets. The
ceiling row of (b) is a bare PyTorch loop: the model compiled with torch.compile, bf16 autocast, fused
AdamW, the loss inside the model, micro-batch 32. Each run is a fresh process; the whole script stays
under 8 minutes on an H200 (--budget: optional runs are skipped, saying so, once it would not).

Reported: tokens/s after the first step, peak GPU memory (torch.cuda.max_memory_allocated), and MFU:
model FLOPs (6 x parameters + attention 12 x layers x width x seq per token; LoRA-frozen weights
still cost 4 of the 6) over the bf16 matmul rate measured on this GPU. Targets: (a) peak <= 3 GiB and
>= 2x Trainer's tokens/s; (b) >= 45% MFU.

--smoke runs every run of the benchmark on CPU, all in one child process, in under a minute (a 1-layer, 64-wide model at seq 64, fp32,
no compile, 3 steps) so that the script's recipes, Trainer arguments and data plumbing are checked
where there is no GPU (tests/test_speed.py does); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.bench import synchronize

SEQ = 512
SETTINGS = {
    "a": {"name": "(a) design: fp16, ckpt, LoRA r=16, 4x4", "lora": True, "precision": "fp16", "checkpointing": True,
          "batch": 4, "accumulation": 4, "compile": False, "auto": False},
    "b": {"name": "(b) throughput: bf16, full, auto batch, compile", "lora": False, "precision": "bf16", "checkpointing": False,
          "batch": 64, "accumulation": 1, "compile": True, "auto": True, "trainer_batch": 32, "bare_batch": 32},
}
# (setting, loop, variant, optional): optional runs are skipped when the time budget would be exceeded
RUNS = [("a", "engine", "", False), ("a", "trainer", "eager", False), ("a", "trainer", "compiled", True),
        ("b", "engine", "", False), ("b", "trainer", "eager", False), ("b", "trainer", "compiled", True),
        ("b", "bare", "compiled", False)]


def text_file() -> Path:
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared" / "data" / "tinyshakespeare-train.txt"
    return shared if shared.exists() else repo / "recipes" / "data" / "quickstart.txt"


def smoke_settings() -> None:
    """--smoke: every setting on CPU with a tiny model (the numbers mean nothing)."""
    global SEQ
    SEQ = 64
    for s in SETTINGS.values():
        s.update(precision="fp32", compile=False, batch=min(s["batch"], 4), trainer_batch=4, bare_batch=4)


def make_model_folder(folder: Path, smoke: bool = False) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import train_tokenizer

    text = text_file().read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text], 512 if smoke else 8192)
    torch.manual_seed(0)
    shape = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": SEQ} if smoke else {"n_layer": 6}
    config = GPT2Config(**shape, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def matmul_tflops() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def flops_per_token(lora: bool) -> float:
    from transformers import GPT2Config

    c = GPT2Config(n_layer=6)
    params = c.n_layer * 12 * c.n_embd**2 + c.vocab_size * c.n_embd  # matmul weights incl. lm_head
    attention = 12 * c.n_layer * c.n_embd * SEQ
    return (4 if lora else 6) * params + attention  # frozen weights: no weight-gradient matmul


def engine_overrides(s: dict, folder: Path, data: Path, steps: int) -> list[str]:
    return [f"model.base={folder}", f"data.train={data}", f"data.max_length={SEQ}", "data.txt_documents=paragraph",
            'data.packing="concat"',  # the blocks Trainer and the bare loops get (run_clm's group_texts): equal work
            f"lora.enabled={str(s['lora']).lower()}", "lora.r=16", "lora.alpha=32", 'lora.target_modules=["c_attn"]',
            f"train.precision={s['precision']}", f"train.gradient_checkpointing={str(s['checkpointing']).lower()}",
            f"train.batch_size={s['batch']}", f"train.gradient_accumulation_steps={s['accumulation']}",
            f"train.compile={str(s['compile']).lower()}", f"train.auto_batch_size={str(s['auto']).lower()}", "train.learning_rate=1e-4"]


def one_engine(key: str, folder: Path, steps: int, out: Path) -> None:
    from engine import bench

    s = SETTINGS[key]
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "lora.toml"
    reset_peak()
    r = bench.run(str(recipe), engine_overrides(s, folder, text_file(), steps), steps)
    out.write_text(json.dumps({"tokens_per_second": r["tokens_per_second"], "peak_bytes": peak_bytes(),
                               "micro_batch": r["micro_batch"], "accumulation": r["accumulation"]}))


def one_trainer(key: str, folder: Path, steps: int, out: Path, variant: str = "eager") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from engine import data as data_mod
    from engine.benchmarks.common import BlockDataset

    s = SETTINGS[key]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = [d for d in text_file().read_text(encoding="utf-8").split("\n\n") if d.strip()]
    blocks = data_mod.build_blocks(docs, tokenizer, SEQ, packing=True)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    if s["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"]))
    marks: list[tuple[float, int]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            marks.append((time.perf_counter(), args.per_device_train_batch_size * args.gradient_accumulation_steps))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=s.get("trainer_batch", s["batch"]),
            gradient_accumulation_steps=s["accumulation"], learning_rate=1e-4, fp16=s["precision"] == "fp16", bf16=s["precision"] == "bf16",
            gradient_checkpointing=s["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
            torch_compile=variant == "compiled" and torch.cuda.is_available(),
            logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=2, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        reset_peak()
        Trainer(model=model, args=args, train_dataset=BlockDataset(blocks, SEQ), callbacks=[Timer()]).train()
    tokens = sum(n for _, n in marks[1:]) * (SEQ - 1)
    out.write_text(json.dumps({"tokens_per_second": tokens / (marks[-1][0] - marks[0][0]), "peak_bytes": peak_bytes(),
                               "micro_batch": marks[-1][1] // s["accumulation"], "accumulation": s["accumulation"]}))


def one_bare(key: str, folder: Path, steps: int, out: Path, variant: str = "compiled") -> None:
    """The ceiling: a plain PyTorch loop, the model compiled, bf16 autocast, fused AdamW, loss inside the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import data as data_mod

    s = SETTINGS[key]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = [d for d in text_file().read_text(encoding="utf-8").split("\n\n") if d.strip()]
    blocks = [b for b in data_mod.build_blocks(docs, tokenizer, SEQ, packing=True) if len(b) == SEQ]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if variant == "compiled" and device == "cuda" else model
    dtype = torch.bfloat16 if s["precision"] == "bf16" else (torch.float16 if s["precision"] == "fp16" else torch.float32)
    batch = s["bare_batch"]
    order = torch.randperm(len(blocks))
    reset_peak()
    marks = []
    for step in range(steps):
        ids = torch.stack([blocks[int(i)] for i in order[(step * batch) % (len(blocks) - batch):][:batch]]).to(device, non_blocking=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (0, steps - 1):
            synchronize()
            marks.append(time.perf_counter())
    tokens = (steps - 1) * batch * (SEQ - 1)
    out.write_text(json.dumps({"tokens_per_second": tokens / (marks[-1] - marks[0]), "peak_bytes": peak_bytes(),
                               "micro_batch": batch, "accumulation": 1}))


def run_name(loop: str, key: str, variant: str | None) -> str:
    return f"{loop}-{key}" + (f"-{variant}" if loop == "trainer" else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("--smoke", action="store_true", help="check the plumbing on CPU: tiny model, 3 steps (numbers mean nothing)")
    ap.add_argument("--budget", type=float, default=450, help="seconds: optional runs are skipped once the script would run longer")
    ap.add_argument("--one", nargs=5, action="append", default=None, help=argparse.SUPPRESS)  # LOOP KEY VARIANT FOLDER OUT (subprocess)
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_settings()
        args.steps = min(args.steps, 3)
    elif not torch.cuda.is_available():
        print("error: benchmark 4 needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.one:  # a child: the runs it was given, in order (one per process on a GPU; all of them in one under --smoke)
        for loop, key, variant, folder, out in args.one:
            if loop == "engine":
                one_engine(key, Path(folder), args.steps, Path(out))
            else:
                (one_trainer if loop == "trainer" else one_bare)(key, Path(folder), args.steps, Path(out), variant)
        return 0
    from engine.benchmarks.common import machine, table, write_json

    os.environ.setdefault("TUNESMITH_CACHE", tempfile.mkdtemp())
    peak = matmul_tflops()
    results: dict = {"machine": machine(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (smoke)",
                     "bf16_matmul_tflops": peak, "smoke": args.smoke}
    rows = []
    started, longest = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "distilgpt2-random"
        make_model_folder(folder, args.smoke)

        def child(runs: list[tuple[str, str, str]]) -> subprocess.CompletedProcess:
            """A fresh process for these runs (LOOP, KEY, VARIANT each), writing Path(tmp)/NAME.json per run."""
            ones = [a for loop, key, variant in runs for a in ("--one", loop, key, variant or "-", str(folder), str(Path(tmp) / f"{run_name(loop, key, variant)}.json"))]
            return subprocess.run([sys.executable, "-m", "engine.benchmarks.gpu", "--steps", str(args.steps),
                                   *(["--smoke"] if args.smoke else []), *ones], capture_output=True, text=True)

        # on a GPU every run gets a fresh process (its own peak memory, no compiled code left over);
        # --smoke checks the same plumbing with every run in one child process
        smoke_child = child([(loop, key, variant) for key, loop, variant, _ in RUNS]) if args.smoke else None
        for key, loop, variant, optional in RUNS:
            s, name = SETTINGS[key], run_name(loop, key, variant)
            if optional and time.perf_counter() - started + longest > args.budget:
                print(f"{s['name']} {loop} {variant}: skipped (the script would pass --budget {args.budget:.0f} s)", flush=True)
                results[name] = {"skipped": "time budget"}
                continue
            out = Path(tmp) / f"{name}.json"
            t0 = time.perf_counter()
            proc = smoke_child or child([(loop, key, variant)])
            longest = max(longest, time.perf_counter() - t0)
            if proc.returncode != 0 or not out.exists():
                print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                results[name] = {"error": proc.stderr[-2000:]}
                continue
            r = json.loads(out.read_text())
            r["mfu"] = r["tokens_per_second"] * flops_per_token(s["lora"]) / (peak * 1e12)
            r["seconds"] = time.perf_counter() - t0
            results[name] = r
            label = {"engine": "engine", "trainer": f"Trainer ({variant})", "bare": "bare PyTorch, compiled (ceiling)"}[loop]
            rows.append((s["name"], label, f"{r['micro_batch']} x {r['accumulation']}", f"{r['tokens_per_second']:,.0f}",
                         f"{r['peak_bytes'] / 2**30:.2f}", f"{r['mfu']:.1%}"))
            print(f"{s['name']} {label}: {r['tokens_per_second']:,.0f} tok/s ({r['seconds']:.0f} s)", flush=True)
        for key in SETTINGS:  # Trainer's best configuration counts
            ran = [results[k] for k in (f"trainer-{key}-eager", f"trainer-{key}-compiled") if "tokens_per_second" in results.get(k, {})]
            if ran:
                results[f"trainer-{key}"] = max(ran, key=lambda r: r["tokens_per_second"])
    results["seconds"] = time.perf_counter() - started
    print(f"\nGPU benchmark{' SMOKE RUN ON CPU (numbers mean nothing)' if args.smoke else ''}, distilgpt2 architecture, seq {SEQ}; {results['gpu']}, bf16 matmul {peak:.0f} TFLOP/s; {machine()}; {results['seconds']:.0f} s")
    print(table(["setting", "loop", "micro x accum", "tokens/s", "peak GiB", "MFU"], rows))
    ea, ta, eb, bb = (results.get(k, {}) for k in ("engine-a", "trainer-a", "engine-b", "bare-b"))
    if "tokens_per_second" in ea and "tokens_per_second" in ta:
        print(f"(a) targets: peak <= 3 GiB (measured {ea['peak_bytes'] / 2**30:.2f}), >= 2x Trainer's best (measured {ea['tokens_per_second'] / ta['tokens_per_second']:.2f}x)")
    if "mfu" in eb:
        ceiling = f"; the bare compiled loop: {bb['mfu']:.1%}" if "mfu" in bb else ""
        print(f"(b) target: MFU >= 45% (measured {eb['mfu']:.1%}{ceiling})")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
