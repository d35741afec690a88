"""Where a compiled program spends its time: a `jax.profiler` trace reduced to a top-N op table.

    rows = op_profile.profile(lambda: step(...).block_until_ready(), "/tmp/trace", {"jit_step": hlo_text})
    print(op_profile.markdown(rows))

Each row is one HLO instruction (a fusion, a cuBLAS GEMM, a cuDNN attention call...) of one module: how many
times it ran per profiled run, its device time per run, its share of all device time, and, where its FLOPs
can be read off the optimized HLO (`hlo_flops`), its achieved TFLOP/s. Device time is the sum of the kernel
events a profiler plane attributes to the op: GPU planes ("/device:GPU:*") when there are any, else the host
CPU plane (a CPU run, as in the tests). XLA disables command buffers (CUDA graphs) while profiling by
default (`--xla_enable_command_buffers_during_profiling=false`), so kernels keep their op names.

FLOPs per instruction: a dot is 2 x output elements x contracted size; a convolution 2 x output elements x
window x input features per group; a cuBLAS GEMM custom call as its dot; a cuDNN attention call 4·B·N·T·S·H
forward and 2.5x that backward (FlashAttention's convention: the backward's five matmuls, counted as such);
a fusion or other call is the sum over the computations it calls. Elementwise work is not counted (its
TFLOP/s column is empty): those ops are bound by memory, not FLOPs.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z0-9]+\[[0-9,]*\])")


def _dims(shape: str) -> list[int]:
    """The dimensions of the first array shape in `shape` ("bf16[2,3]{1,0}" -> [2, 3]; tuples: the first)."""
    m = _SHAPE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _ints(text: str, key: str) -> list[int]:
    """`key={1,2}` (HLO attribute) or `"key":["1","2"]` (backend_config JSON) -> [1, 2]; [] when absent."""
    m = re.search(rf"{key}=\{{([0-9,]*)\}}", text) or re.search(rf'"{key}":\[([^\]]*)\]', text)
    return [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip('" ')] if m else []


def _operands(args: str) -> list[str]:
    """The operand names of an instruction's argument text (up to the closing parenthesis)."""
    depth, end = 0, len(args)
    for i, ch in enumerate(args):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                end = i
                break
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args[:end])


def _instruction_flops(op: str, out: str, operands: list[list[int]], rest: str) -> float:
    """FLOPs of one instruction, without what it calls (see the module docstring); 0 when not counted."""
    if op == "dot" or (op == "custom-call" and re.search(r'custom_call_target="__cublas', rest)):
        lhs = operands[0] if operands else []
        contracted = math.prod(lhs[d] for d in _ints(rest, "lhs_contracting_dim(?:ension)?s") if d < len(lhs))
        return 2.0 * math.prod(_dims(out)) * contracted
    if op == "convolution" and len(operands) > 1:
        window = [int(s) for s in re.search(r"size=([0-9x]+)", rest).group(1).split("x")] if "size=" in rest else []
        labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
        rhs = operands[1]
        per_group = rhs[labels.group(1).index("i")] if labels and "i" in labels.group(1) else 1
        return 2.0 * math.prod(_dims(out)) * math.prod(window) * per_group
    target = re.search(r'custom_call_target="(__cudnn\$fmha[^"]*)"', rest)
    if op == "custom-call" and target and len(operands) > 1:
        q, k = operands[0], operands[1]
        bmm1 = rest[rest.find("bmm1_dot_dimension_numbers") :]  # q @ k^T: [B, T, N, H] x [B, S, N, H] by default
        batch = _ints(bmm1, "lhs_batch_dimensions") or [0, 2]
        head = _ints(bmm1, "lhs_contracting_dimensions") or [3]
        bnh = math.prod(q[d] for d in batch + head)
        forward = 4.0 * math.prod(q) * math.prod(k) / bnh if bnh else 0.0
        return forward * (2.5 if "Backward" in target.group(1) else 1.0)
    return 0.0


def _parse(hlo_text: str) -> tuple[dict[str, float], dict[str, str]]:
    """(FLOPs by instruction, what each instruction is) of an optimized HLO module's text; a fusion / call /
    while instruction's FLOPs include the computations it calls once."""
    shapes: dict[str, list[int]] = {}
    own: dict[str, float] = {}
    what: dict[str, str] = {}
    calls: dict[str, list[str]] = {}
    body: dict[str, list[str]] = collections.defaultdict(list)  # computation -> its instructions
    computation = ""
    for line in hlo_text.splitlines():
        if header := _HEADER.match(line):
            computation = header.group(1)
            for name, shape in _PARAM.findall(header.group(2)):
                shapes[name] = _dims(shape)
            continue
        if not (m := _DEF.match(line)):
            continue
        name, out, op, rest = m.groups()
        shapes[name] = _dims(out)
        body[computation].append(name)
        own[name] = _instruction_flops(op, out, [shapes.get(o, []) for o in _operands(rest)], rest)
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        source = re.search(r'op_name="([^"]+)"', rest)
        what[name] = target.group(1) if target else op
        if source:  # the JAX operation it came from, without the jit(...) prefix
            what[name] += ": " + "/".join(source.group(1).split("/")[1:])[-60:]
        callee = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        calls[name] = callee + [c for group in re.findall(r"called_computations=\{([^}]*)\}", rest) for c in
                                re.findall(r"%?([\w.\-]+)", group)]  # fmt: skip

    def total(name: str, seen: frozenset = frozenset()) -> float:
        inner = sum(total(i, seen | {c}) for c in calls.get(name, ()) if c not in seen for i in body.get(c, ()))
        return own.get(name, 0.0) + inner

    return {name: f for name in own if (f := total(name))}, what


def hlo_flops(hlo_text: str) -> dict[str, float]:
    """FLOPs of each instruction of an optimized HLO module's text (`compiled.as_text()`), by name, for those
    with counted FLOPs; a fusion/call/while instruction's count includes the computations it calls once."""
    return _parse(hlo_text)[0]


def category(what: str, flops: float | None) -> str:
    """attention / matmul / convolution / collective / other (memory-bound) for an instruction's `what`."""
    if "fmha" in what or "attention" in what.lower():
        return "attention"
    if re.match(r"(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)", what):
        return "collective"
    if "conv" in what.split(":")[0] or (flops and "conv_general" in what):
        return "convolution"
    return "matmul" if flops else "other"


def device_events(xplane: str | Path) -> list[tuple[str, str, float]]:
    """(module, op, duration in seconds) of every kernel event in a trace: events of GPU planes when any
    exist, else of the host CPU plane's XLA threads; the op is the event's `hlo_op` stat (the kernel's name
    when a plane does not annotate it)."""
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(str(xplane)).planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    events = []
    for plane in gpu or [p for p in planes if p.name == "/host:CPU"]:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if not gpu and "hlo_op" not in stats:
                    continue  # host threads' own work (Python, the runtime)
                module = str(stats.get("hlo_module", ""))
                events.append((module, str(stats.get("hlo_op", event.name)), event.duration_ns * 1e-9))
    return events


def op_table(
    events: Iterable[tuple[str, str, float]],
    flops: dict[str, float],
    runs: int = 1,
    top: int = 15,
    what: dict[str, str] | None = None,
) -> list[dict]:
    """The `top` ops by device time: dicts of op, what it is (`what`, from _parse), its category, module,
    calls and ms per run, share (%) of all device time, and TFLOP/s where its FLOPs are known (`flops`)."""
    what = what or {}
    time, count = collections.Counter(), collections.Counter()
    for module, op, seconds in events:
        time[module, op] += seconds
        count[module, op] += 1
    busy = sum(time.values()) or 1.0
    rows = []
    for (module, op), seconds in time.most_common(top):
        f = flops.get(op)
        rows.append(
            dict(op=op, what=what.get(op, ""), category=category(what.get(op, op), f), module=module,
                 calls=count[module, op] / runs, ms=1e3 * seconds / runs,
                 share=100 * seconds / busy, tflops=f * count[module, op] / seconds / 1e12 if f and seconds else None)
        )  # fmt: skip
    return rows


def markdown(rows: list[dict], title: str = "") -> str:
    """A markdown table of `op_table` rows."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| op | what | kind | calls/run | ms/run | share | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{r['tflops']:.3g}" if r["tflops"] else ""
        cells = (f"`{r['op']}`", r["what"], r["category"], f"{r['calls']:g}", f"{r['ms']:.2f}", f"{r['share']:.1f} %")
        lines.append("| " + " | ".join((*cells, tflops)) + " |")
    return "\n".join(lines)


def profile(run: Callable[[], object], logdir: str | Path, hlo_texts: Iterable[str], runs: int = 1, top: int = 15):
    """Trace `runs` calls of `run` (which must block until its results are ready) into `logdir` and return
    the top-`top` op table; `hlo_texts`: the optimized HLO of the programs `run` executes."""
    import jax

    with jax.profiler.trace(str(logdir)):
        for _ in range(runs):
            run()
    newest = max(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True), key=lambda p: Path(p).stat().st_mtime)
    flops, what = {}, {}
    for text in hlo_texts:
        f, w = _parse(text)
        flops.update(f)
        what.update(w)
    return op_table(device_events(newest), flops, runs, top, what)


def save(rows: list[dict], path: str | Path, title: str) -> None:
    """Append the table to `path` (markdown) and its rows to `path` + ".jsonl"."""
    with open(path, "a") as f:
        f.write(markdown(rows, title) + "\n\n")
    with open(f"{path}.jsonl", "a") as f:
        f.writelines(json.dumps({"table": title, **r}) + "\n" for r in rows)
