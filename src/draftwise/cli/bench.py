"""``draftwise bench``: flags, output files, the Markdown table on stdout (the measuring is
:mod:`draftwise.bench`'s)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "bench_command", "split_methods"]


def add_parser(commands: Any) -> None:
    from draftwise.bench.runner import PEERS
    from draftwise.cli.flags import (
        add_backend_flags,
        add_budget_flag,
        add_config_flags,
        add_model_flags,
        positive_int,
    )
    from draftwise.sampling import SamplingConfig

    bench = commands.add_parser(
        "bench",
        help="measure methods against plain decoding (speed, MAT, exactness)",
        description="Run methods over Spec-Bench-format questions, always against plain "
        "decoding ('none') in the same process, interleaved after a warm-up. Prints a Markdown "
        "table; --out also writes records.jsonl, summary.json, table.md and chart.png. "
        "Peers: " + "; ".join(f"{k}: {v}" for k, v in PEERS.items()) + ".",
    )
    add_model_flags(bench)
    bench.add_argument(
        "--methods", default="none,pld",
        help="comma-separated method specs, each NAME[:key=value,...][@BUDGET], e.g. "
        "none,pld:max_ngram=4,depth=6,recycling@8,recycling@auto,hf-pld (default: none,pld)",
    )
    add_budget_flag(bench)
    add_backend_flags(bench)
    bench.add_argument("--questions", default=None, metavar="PATH",
                       help="Spec-Bench-format JSONL (default: the packaged question set)")
    bench.add_argument("--workload", choices=("questions", "code-edit", "agent"),
                       default="questions",
                       help="questions: --questions (Spec-Bench format); code-edit: editing "
                       "tasks on functions from the Python standard library's own source, each "
                       "with its original code as a predicted output; agent: a coding agent's "
                       "two-turn loop of write_file tool calls over the same functions "
                       "(default: questions)")
    bench.add_argument("--engine", choices=("draftwise", "vllm"), default="draftwise",
                       help="vllm: the questions through vLLM's offline LLM (greedy, one "
                       "request at a time, each method its own engine): none, vLLM's own "
                       "ngram and suffix, and draftwise methods as its custom_class proposer "
                       "(draftwise/suffix for ours); needs pip install -e \".[vllm]\" "
                       "(default: draftwise)")
    bench.add_argument("--spec-tokens", type=positive_int, default=8, metavar="K",
                       help="--engine vllm: num_speculative_tokens, the longest draft vLLM "
                       "verifies (default: 8)")
    bench.add_argument("--prediction", action="store_true",
                       help="also run each of our methods given each question's predicted "
                       "output (code-edit: the original code), named METHOD+prediction")
    bench.add_argument("--limit", type=positive_int, default=None,
                       help="at most N questions per category")
    bench.add_argument("--categories", default="",
                       help="comma-separated categories (default: all)")
    bench.add_argument("--max-new-tokens", type=positive_int, default=256, help="default: 256")
    bench.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    bench.add_argument("--heads", default=None, metavar="FILE",
                       help="head file for medusa/hydra (default: the one shipped for the "
                       "default model)")
    bench.add_argument("--draft", default=None, metavar="MODEL",
                       help="draft model for the draft method, hf-assisted and llamacpp-draft "
                       "(same spec forms as --model)")
    bench.add_argument("--llama-server", default=None, metavar="PATH",
                       help="the native llama-server the llamacpp peers drive (default: "
                       "$DRAFTWISE_LLAMA_SERVER, else llama-server on PATH, else "
                       "~/.cache/draftwise/llamacpp/build/bin); 'xllamacpp': the prebuilt "
                       "wheel's server (plain only); 'npm': the node-llama-cpp fallback")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="write result files here (records.partial.jsonl grows during the run, "
                       "so an interrupted run keeps what it measured)")
    bench.add_argument(
        "--structured", default=None, metavar="PATH",
        help="structured mode: JSON Schemas from a folder of MaskBench-style files (or a JSONL "
        "of objects with a 'schema'); --limit N takes N spread evenly over them. Reports "
        "compile and mask times, forced-token share, speedup over constrained plain decoding, "
        "validity",
    )
    bench.add_argument("--whitespace", choices=("compact", "flexible"), default="compact",
                       help="JSON whitespace in --structured mode (default: compact)")
    bench.add_argument("--cost", action="store_true",
                       help="measure the step-cost curve c(n)/c(1) instead of questions")
    bench.add_argument("--cost-max", type=positive_int, default=64,
                       help="largest n for --cost (default: 64)")
    bench.add_argument("--cost-repeats", type=positive_int, default=5,
                       help="timed repetitions per n for --cost (default: 5)")
    load = bench.add_argument_group(
        "load on a server (greedy chat requests, streaming; methods sent per request)")
    where = load.add_mutually_exclusive_group()
    where.add_argument("--serve", default=None, metavar="URL",
                       help="an OpenAI-compatible server already running at URL")
    where.add_argument("--spawn", action="store_true",
                       help="start 'draftwise serve' (with --model, --backend, --budget and "
                       "--max-batch = the most clients) for the run")
    load.add_argument("--clients", default="1,2,4,8",
                      help="concurrent client counts (default: 1,2,4,8)")
    load.add_argument("--rounds", type=int, default=1,
                      help="run the levels this many times, every other time in reverse "
                      "order, and merge them (a machine whose speed drifts during the run "
                      "then favours no level; default: 1)")
    load.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                      help="instead of the levels: the most --clients send a mix of requests "
                      "(streaming, n=2 sampled, json_schema, completions, two-turn chats, "
                      "clients dropping mid-stream, malformed and hostile bodies) for "
                      "SECONDS, each reply checked; reports failures and the spawned server's "
                      "RSS over time "
                      "(exit status 1 on any failure)")
    load.add_argument("--hostile", action="store_true",
                      help="instead of the levels: hostile requests (unbounded options, server "
                      "file paths, huge bodies, bad sampling values, malformed and deep bodies, "
                      "prefix-cache probing, clients leaving) beside a normal client; reports "
                      "each case, 5xx replies, changed answers, latency against idle and the "
                      "spawned server's RSS (exit status 1 on any failure)")
    load.add_argument("--api-key", default=None, metavar="KEY",
                      help="the API key to send (with --spawn, the server is started with it)")
    sampling = bench.add_argument_group("sampling (temperature 0 = greedy)")
    add_config_flags(sampling, SamplingConfig)
    bench.set_defaults(handler=bench_command)


@contextlib.contextmanager
def _partial_records(out: Path | None) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A callback that appends each record to ``out/records.partial.jsonl`` as it is made, so
    an interrupted run keeps what it measured (a no-op without ``out``)."""
    if out is None:
        yield lambda record: None
        return
    with open(out / "records.partial.jsonl", "w", encoding="utf-8") as partial:

        def keep(record: dict[str, Any]) -> None:
            partial.write(json.dumps(record) + "\n")
            partial.flush()

        yield keep


def split_methods(text: str) -> tuple[str, ...]:
    """``"none,pld:budget=16,depth=4,hf-pld"`` -> ``("none", "pld:budget=16,depth=4",
    "hf-pld")``: a comma starts a new method unless what follows is another ``key=value``."""
    methods: list[str] = []
    for segment in (s.strip() for s in text.split(",")):
        if not segment:
            continue
        if methods and "=" in segment and ":" not in segment.split("=")[0]:
            methods[-1] += "," + segment
        else:
            methods.append(segment)
    return tuple(methods)


def bench_command(args: argparse.Namespace) -> int:
    from draftwise.api import Generator
    from draftwise.bench import report
    from draftwise.bench.runner import (
        PEERS,
        WITH_PREDICTION,
        BenchConfig,
        build_runners,
        environment,
        run_bench,
    )
    from draftwise.cli.flags import config_from_args
    from draftwise.method import MethodSpec, parse_budget
    from draftwise.models import load_model
    from draftwise.sampling import SamplingConfig

    sampling = config_from_args(args, SamplingConfig)
    parse_budget(args.budget)

    def is_peer(spec: str) -> bool:  # a peer's name, before any options or budget
        return spec.split(":")[0].split("@")[0] in PEERS

    if args.engine == "vllm":
        if args.serve or args.spawn or args.structured or args.cost or args.prediction:
            raise ValueError("--engine vllm runs questions in process: no --serve, --spawn, "
                             "--structured, --cost or --prediction")
        return _vllm(args, split_methods(args.methods), sampling)
    methods = tuple(m if is_peer(m)
                    else str(MethodSpec.parse(m, draft=args.draft, heads=args.heads))
                    for m in split_methods(args.methods))
    if args.structured:
        from draftwise.bench.structured import load_schemas

        load_schemas(args.structured, args.limit)  # a bad path fails before the model loads
        if any(is_peer(m) for m in methods):
            raise ValueError("--structured runs draftwise methods only (no transformers peers)")
    questions = _questions(args)
    if args.prediction:
        if not any(q.prediction for q in questions):
            raise ValueError("--prediction: these questions carry no predicted output "
                             "(--workload code-edit does)")
        if args.serve or args.spawn or args.structured:
            raise ValueError("--prediction runs in process, on questions")
        ours = ["none", *(m for m in methods if m != "none" and not is_peer(m))]
        methods = methods + tuple(m + WITH_PREDICTION for m in ours)
    out = Path(args.out) if args.out else None
    if args.soak is not None and not (args.serve or args.spawn):
        raise ValueError("--soak needs a server: --serve URL or --spawn")
    if args.hostile and not (args.serve or args.spawn):
        raise ValueError("--hostile needs a server: --serve URL or --spawn")
    if args.serve or args.spawn:
        return _load(args, methods, [q.turns[0] for q in questions], out)
    chart_missing = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        chart_missing = report.chart_unavailable()
        if chart_missing and not (args.cost or args.structured):
            print(f"draftwise: no chart.png this run: {chart_missing}", file=sys.stderr)
    model = load_model(args.model, cache_dir=args.cache_dir)
    draft = load_model(args.draft, cache_dir=args.cache_dir) if args.draft else None
    generator = Generator(model, "none", budget=args.budget, cache_dir=args.cache_dir,
                          backend=args.backend, exact=args.exact)

    if args.cost:
        return _cost(args, generator, questions[0].turns[0], out)
    if args.structured:
        return _structured(args, generator, methods, sampling, out)

    def skipped(spec: str, reason: str) -> None:
        print(f"draftwise: skipping {spec}: {reason}", file=sys.stderr)

    runners = build_runners(generator, methods, draft, skipped=skipped,
                            llama_server=args.llama_server)  # bad peers fail first
    config = BenchConfig(methods, generator.config(
        max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed
    ))
    with _partial_records(out) as keep:
        records = run_bench(generator, questions, config, runners, on_record=keep)
    report.mark_exactness(records)
    summary = report.summarize(records)
    summary["environment"] = environment(model, draft)
    summary["environment"]["backend"] = (generator.backend_name
                                         + generator.backend.capabilities.cost_tag)
    summary["settings"] = {
        "methods": list(methods), "max_new_tokens": args.max_new_tokens,
        "questions": args.questions or "packaged", "workload": args.workload,
        "prediction": args.prediction, "limit": args.limit,
        "categories": args.categories or "all", "sampling": vars(sampling), "seed": args.seed,
        "budget": args.budget, "backend": args.backend, "exact": args.exact,
    }
    table = report.markdown(summary)
    sys.stdout.write(table)
    if out is not None:
        (out / "records.partial.jsonl").rename(out / "records.jsonl")
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (out / "table.md").write_text(table, encoding="utf-8")
        written = ["records.jsonl", "summary.json", "table.md"]
        if chart_missing is None:
            report.chart(summary, out / "chart.png")
            written.append("chart.png")
        print(f"\nwrote {', '.join(f'{out}/{name}' for name in written)}", file=sys.stderr)
    return 0


def _questions(args: argparse.Namespace) -> list[Any]:
    from draftwise.bench.datasets import load_questions, select

    if args.workload != "questions":
        if args.questions:
            raise ValueError(f"--workload {args.workload} makes its own questions: drop "
                             "--questions")
        from draftwise.bench.code_edit import agent_questions, code_edit_questions

        pool = code_edit_questions() if args.workload == "code-edit" else agent_questions()
    else:
        pool = load_questions(args.questions)
    return select(pool, categories=[c.strip() for c in args.categories.split(",") if c.strip()],
                  limit=args.limit)


def _vllm(args: argparse.Namespace, methods: tuple[str, ...], sampling: Any) -> int:
    from draftwise.bench import report
    from draftwise.bench.runner import environment, prompt_ids
    from draftwise.bench.vllm_engine import run_vllm_bench, speculative_config
    from draftwise.models import load_model

    if not sampling.greedy:
        raise ValueError("--engine vllm compares greedy outputs: drop the sampling flags")
    for method in methods:
        speculative_config(method, args.spec_tokens)  # a bad spec fails before anything loads
    questions = _questions(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, cache_dir=args.cache_dir)
    tokenizer = model.tokenizer

    def skipped(spec: str, reason: str) -> None:
        print(f"draftwise: skipping {spec}: {reason}", file=sys.stderr)

    with _partial_records(out) as keep:
        records, counters = run_vllm_bench(
            model, questions, methods,
            prompt=lambda turns, answers: prompt_ids(tokenizer, turns, answers),
            max_new_tokens=args.max_new_tokens, num_speculative_tokens=args.spec_tokens,
            seed=args.seed, skipped=skipped, on_record=keep)
    report.mark_exactness(records)
    summary = report.summarize(records)
    summary["environment"] = environment(model, None)
    import vllm

    summary["environment"]["engine"] = f"vLLM {vllm.__version__}"
    summary["vllm"] = counters
    summary["settings"] = {
        "engine": "vllm", "methods": list(methods), "max_new_tokens": args.max_new_tokens,
        "num_speculative_tokens": args.spec_tokens, "workload": args.workload,
        "questions": args.questions or "packaged", "limit": args.limit, "seed": args.seed,
    }
    table = report.markdown(summary)
    lines = [f"| {name} | {c['mean_acceptance_length']:.2f} | {c['drafts']:.0f} |"
             for name, c in counters.items() if c["mean_acceptance_length"] is not None]
    if lines:
        table += ("\nvLLM's own spec-decode counters (mean acceptance length = 1 + accepted "
                  "per drafting step):\n\n| method | mean acceptance length | drafting steps "
                  "|\n|---|---:|---:|\n" + "\n".join(lines) + "\n")
    sys.stdout.write(table)
    if out is not None:
        (out / "records.partial.jsonl").rename(out / "records.jsonl")
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (out / "table.md").write_text(table, encoding="utf-8")
    return 0


def _load(args: argparse.Namespace, methods: tuple[str, ...], prompts: list[str],
          out: Path | None) -> int:
    from draftwise.bench import load

    try:
        clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError as error:
        raise ValueError(f"--clients must be comma-separated numbers: {args.clients!r}") from error
    if not clients or clients[0] < 1:
        raise ValueError("--clients needs counts >= 1")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.soak is not None and not args.soak > 0:
        raise ValueError(f"--soak needs a number of seconds > 0, got {args.soak}")
    process = None
    url = args.serve
    if args.spawn:
        serve_args = ["--model", args.model, "--max-batch", str(clients[-1]),
                      "--budget", str(args.budget), "--method", methods[0]]
        if args.backend in ("quant", "fast"):
            serve_args += ["--backend", args.backend]
        if args.cache_dir:
            serve_args += ["--cache-dir", args.cache_dir]
        if args.api_key:
            serve_args += ["--api-key", args.api_key]
        url, process = load.spawn_server(serve_args)
    try:
        if args.hostile:
            return _hostile(args, url, prompts, process, out)
        if args.soak is not None:
            return _soak(args, url, methods[0], prompts, clients[-1], process, out)
        results = load.run_load(url, prompts, methods, clients, args.max_new_tokens,
                                rounds=args.rounds)
    finally:
        if process is not None:
            load.stop_server(process)
    rows = load.summarize(results)
    sys.stdout.write(load.markdown(rows))
    if out is not None:
        settings = {"url": args.serve or "spawned", "methods": list(methods),
                    "clients": clients, "questions": args.questions or "packaged",
                    "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                    "rounds": args.rounds, "model": args.model, "backend": args.backend,
                    "budget": args.budget}
        written = load.write(rows, results, out, settings)
        print(f"\nwrote {', '.join(f'{out}/{name}' for name in written)}", file=sys.stderr)
    return 0


def _hostile(args: argparse.Namespace, url: str, prompts: list[str], process: Any,
             out: Path | None) -> int:
    from draftwise.bench import hostile, load, soak

    rss = soak.process_rss(process.pid) if process is not None else None
    result = hostile.run_hostile(load.server_root(url), prompts[:4], "default",
                                 api_key=args.api_key, rss=rss)
    table = hostile.markdown(result)
    sys.stdout.write(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "hostile.json").write_text(json.dumps(result.summary(), indent=2),
                                          encoding="utf-8")
        (out / "hostile.md").write_text(table, encoding="utf-8")
        print(f"\nwrote {out}/hostile.json, {out}/hostile.md", file=sys.stderr)
    return 0 if result.failures == 0 else 1


def _soak(args: argparse.Namespace, url: str, method: str, prompts: list[str], clients: int,
          process: Any, out: Path | None) -> int:
    from draftwise.bench import load, soak

    rss = soak.process_rss(process.pid) if process is not None else None
    result = soak.run_soak(url, prompts, args.soak, clients, method=method,
                           model=load._model_id(load.server_root(url)), rss=rss)
    table = soak.markdown(result)
    sys.stdout.write(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
        (out / "soak.md").write_text(table, encoding="utf-8")
        print(f"\nwrote {out}/soak.json, {out}/soak.md", file=sys.stderr)
    failed = sum(result.failed.values())
    return 0 if failed == 0 and result.healthy_after else 1


def _structured(args: argparse.Namespace, generator: Any, methods: tuple[str, ...],
                sampling: Any, out: Path | None) -> int:
    from draftwise.bench.runner import environment
    from draftwise.bench.structured import (
        load_schemas,
        markdown,
        run_structured,
        summarize_structured,
    )

    schemas = load_schemas(args.structured, args.limit)
    config = generator.config(max_new_tokens=args.max_new_tokens, sampling=sampling,
                              seed=args.seed)
    with _partial_records(out) as keep:
        runs, schema_records = run_structured(generator, schemas, methods, config,
                                              whitespace=args.whitespace, on_record=keep)
    summary = summarize_structured(runs, schema_records)
    summary["environment"] = environment(generator.model)
    summary["settings"] = {
        "structured": args.structured, "methods": list(methods), "limit": args.limit,
        "max_new_tokens": args.max_new_tokens, "sampling": vars(sampling), "seed": args.seed,
        "budget": args.budget, "backend": args.backend, "whitespace": args.whitespace,
    }
    table = markdown(summary)
    sys.stdout.write(table)
    if out is not None:
        with open(out / "records.jsonl", "w", encoding="utf-8") as file:  # with exactness
            file.writelines(json.dumps(r) + "\n" for r in runs)
        (out / "records.partial.jsonl").unlink()
        with open(out / "schemas.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(s) + "\n" for s in schema_records)
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (out / "table.md").write_text(table, encoding="utf-8")
        print(f"\nwrote {out}/records.jsonl, schemas.jsonl, summary.json, table.md",
              file=sys.stderr)
    return 0


def _cost(args: argparse.Namespace, generator: Any, prompt: str, out: Path | None) -> int:
    from draftwise.backends.quant import QuantBackend
    from draftwise.cost import measure_step_cost

    sizes = list(range(1, args.cost_max + 1))
    backend = generator.backend
    curve = measure_step_cost(backend, generator.encode(prompt), sizes, repeats=args.cost_repeats)
    limits = backend.machine_limits() if isinstance(backend, QuantBackend) else None
    floors: dict[str, Any] = {}
    lines = ["| n | ms/step | c(n)/c(1) |", "|---:|---:|---:|"]
    rows = [f"| {n} | {v['seconds'] * 1e3:.2f} | {v['relative']:.2f} |" for n, v in curve.items()]
    if limits is not None:
        # a step cannot beat reading every weight once, nor n rows' multiply-adds at the
        # machine's rate; with both overlapped perfectly its floor is the larger of the two
        read_bytes, macs = backend.step_weights()
        bandwidth, peak = limits
        floors = {"step_bytes": read_bytes, "step_multiply_adds": macs,
                  "read_bandwidth": bandwidth, "int8_multiply_adds_per_s": peak}
        lines = ["| n | ms/step | c(n)/c(1) | floor ms | floor / ms/step |",
                 "|---:|---:|---:|---:|---:|"]
        rows = []
        for n, v in curve.items():
            floor = max(read_bytes / bandwidth, n * macs / peak)
            v["floor_seconds"] = floor
            rows.append(f"| {n} | {v['seconds'] * 1e3:.2f} | {v['relative']:.2f} | "
                        f"{floor * 1e3:.2f} | {floor / v['seconds']:.0%} |")
    table = "\n".join(lines + rows) + "\n"
    if limits is not None:
        one = curve[1]["seconds"]
        table += (
            f"\none row reads {read_bytes / 1e6:.1f} MB of weights and does "
            f"{macs / 1e9:.2f} G multiply-adds: c(1) {one * 1e3:.2f} ms = "
            f"{read_bytes / one / 1e9:.1f} GB/s\n"
            f"this machine, measured now with the kernels' threads: reads "
            f"{bandwidth / 1e9:.1f} GB/s, 8-bit multiply-adds {peak / 1e9:.0f} G/s "
            f"(an extra row at that rate: {macs / peak * 1e3:.2f} ms)\n"
        )
    sys.stdout.write(table)
    if out is not None:
        (out / "cost.json").write_text(json.dumps(
            {"model": generator.model.name, "backend": args.backend, "exact": args.exact,
             "curve": curve, **floors}, indent=2
        ), encoding="utf-8")
        (out / "cost.md").write_text(table, encoding="utf-8")
    return 0
