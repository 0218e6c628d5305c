"""The ``vlatlas`` command: extract, embed, probe, intervene, sql, app, demo.

Every failure a user can cause (a bad manifest, an unknown model family, a
refused query, a lake that isn't one) ends in one sentence on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(msg: str, code: int = 1) -> int:
    print(f"vlatlas: error: {msg}", file=sys.stderr)
    return code


def cmd_extract(a: argparse.Namespace) -> int:
    from pipeline.extraction.executor import RayError
    from pipeline.extraction.run import RunConflict, run_spec
    from pipeline.extraction.spec import RunSpec

    spec = RunSpec.from_options(a.model, a.data, a.lake, a.run, batch_size=a.batch_size, device=a.device,
                                dtype=a.dtype, limit=a.limit, keep_attention=a.keep_attention,
                                keep_hidden=a.keep_hidden, chunk_size=a.chunk_size, overwrite=a.overwrite,
                                progress=not a.quiet, revision=a.revision, workers=a.workers, ray=a.ray,
                                ray_actors=a.ray_actors, ray_cpus=a.ray_cpus, explain=a.explain,
                                capture_modules=a.capture_modules)
    try:
        s = run_spec(spec)
    except KeyboardInterrupt:
        print(f"\nvlatlas: stopped. Finished chunks are saved; run the same command again to resume run {a.run!r}.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RunConflict, RayError) as e:
        return _fail(str(e))
    print(s.line())
    return 0


def cmd_sql(a: argparse.Namespace) -> int:
    from lake.catalog import Catalog
    from lake.format import format_table

    cat = Catalog(a.lake, timeout_s=a.timeout, max_rows=a.max_rows)
    res = cat.user_sql(a.query)
    if a.format == "csv":
        res.df.to_csv(sys.stdout, index=False)
    elif a.format == "json":
        print(res.df.to_json(orient="records", force_ascii=False))
    else:
        print(format_table(res.df, truncated=res.truncated))
    return 0


APP = Path(__file__).resolve().parent.parent / "streamlit_app" / "app.py"
LOOPBACK = "127.0.0.1"
# What `vlatlas app` sets when the user's Streamlit configuration does not: the server listens on this
# machine only (the app runs a model on uploads and SQL over the lake), and the browser sends Streamlit
# no usage statistics (a request leaving the machine).
LOCAL_DEFAULTS = {"server.address": LOOPBACK, "browser.gatherUsageStats": "false"}
READ_ONLY_ENV = "VLATLAS_READ_ONLY"  # pipeline.live's (not imported here: the wrapper stays small)
URL_LINE = re.compile(r"URL:\s*(https?://\S+)")  # Streamlit's "Local URL: http://localhost:8501"


def streamlit_configured(option: str) -> bool:
    """Whether the user's Streamlit configuration sets ``option`` (``section.key``): its
    ``STREAMLIT_SECTION_KEY`` environment variable, or a ``config.toml`` Streamlit reads (``~/.streamlit``,
    ``./.streamlit``, the app's folder's ``.streamlit``). Read without importing Streamlit."""
    import tomllib

    section, key = option.split(".")
    if "STREAMLIT_" + re.sub(r"(?<!^)(?=[A-Z])", "_", option.replace(".", "_")).upper() in os.environ:
        return True
    for folder in (Path.home(), Path.cwd(), APP.parent):
        try:
            with open(folder / ".streamlit" / "config.toml", "rb") as fh:
                if key in tomllib.load(fh).get(section, {}):
                    return True
        except (OSError, tomllib.TOMLDecodeError):  # Streamlit reports a broken file itself
            continue
    return False


def streamlit_command(port: int | None, headless: bool | None, interactive: bool, address: str | None = None,
                      defaults: dict[str, str] | None = None) -> list[str]:
    """``streamlit run`` with only what the user asked for (``port``, ``address``, ``headless``) and
    those of ``defaults`` (``{"section.key": value}``) that Streamlit's own configuration (its
    ``STREAMLIT_*`` environment variables, ``.streamlit/config.toml``) does not set: that configuration
    decides everything else. Without a terminal the server runs headless (it would otherwise stop at
    Streamlit's first-run e-mail prompt), unless the user said otherwise."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP)]
    if address is not None:
        cmd += ["--server.address", address]
    for option, value in (defaults or {}).items():
        if not (option == "server.address" and address is not None) and not streamlit_configured(option):
            cmd += [f"--{option}", value]
    if port is not None:
        cmd += ["--server.port", str(port)]
    if headless is None and not interactive and "STREAMLIT_SERVER_HEADLESS" not in os.environ:
        headless = True
    if headless is not None:
        cmd += ["--server.headless", "true" if headless else "false"]
    return cmd


class _Exit(Exception):
    """A step run in a child process failed; it has said why on stderr."""

    def __init__(self, code: int):
        self.code = code


def _in_child(fn) -> str:
    """``fn()`` (a string) computed in a forked child, so that what it imports (DuckDB, pyarrow, torch
    for the demo's extraction) never weighs on the wrapper that waits on Streamlit for hours. A failure
    there is reported there, as :func:`main` would, and raises :class:`_Exit` here."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        code = 1
        try:
            os.write(w, fn().encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported as main() reports it
            try:
                code = _report(e)
            except BaseException:  # noqa: BLE001 - VLATLAS_DEBUG: the traceback
                import traceback

                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise _Exit(EXIT_INTERRUPTED if code == -signal.SIGINT else code)
    return out


def _free_port(address: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _streamlit(uri: str, shown: str, a: argparse.Namespace) -> int:
    """Run the app's server on the lake ``uri`` until it exits; SIGTERM and SIGINT are passed on to it,
    and its exit code is ours. Streamlit's output is passed on, and once its URL line names the port the
    server listens on (another than the configured one when that was taken), so does ours."""
    env = dict(os.environ, VLATLAS_LAKE=uri, PYTHONUNBUFFERED="1")
    if a.read_only:
        env[READ_ONLY_ENV] = "1"
    port = _free_port(a.address or LOOPBACK) if a.port == 0 else a.port
    cmd = streamlit_command(port, a.headless, sys.stdin.isatty() and sys.stdout.isatty(), a.address, LOCAL_DEFAULTS)
    mode = ", read-only: no live examples" if a.read_only else ""
    print(f"vlatlas: starting the app on {shown}{mode} …", file=sys.stderr)
    proc: subprocess.Popen | None = None

    def forward(signum, _frame):
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
        said, echo = False, True
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if echo:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except OSError:  # our output was closed (`vlatlas app | head`): the server goes on
                    echo = False
            if not said and (m := URL_LINE.search(line)):
                said = True
                try:
                    print(f"vlatlas: serving {shown} at {m.group(1)}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
                except OSError:
                    pass
        code = proc.wait()
    except BaseException:  # never a server left behind without its vlatlas
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


def _lake_uri(lake: str) -> str:
    """The lake's URI, once the catalog has opened it (a clear error now rather than in the browser)."""
    from lake.catalog import open_catalog
    from lake.store import open_store

    open_catalog(lake).close()
    return open_store(lake).uri


def cmd_app(a: argparse.Namespace) -> int:
    return _streamlit(_in_child(lambda: _lake_uri(a.lake)), a.lake, a)


def _demo_lake(a: argparse.Namespace) -> str:
    from lake.store import open_store
    from pipeline.demo.build import build_demo_lake

    return open_store(build_demo_lake(Path(a.lake), n=a.n, progress=not a.quiet, rebuild=a.rebuild)).uri


def cmd_demo(a: argparse.Namespace) -> int:
    if a.no_app:
        _demo_lake(a)
        return 0
    return _streamlit(_in_child(lambda: _demo_lake(a)), a.lake, a)


def cmd_demo_data(a: argparse.Namespace) -> int:
    from pipeline.demo.shapes import write_dataset

    if a.n < 1:
        raise ValueError("--n must be at least 1")
    print(f"wrote {write_dataset(a.out, a.n, a.seed)}")
    return 0


def cmd_demo_train(a: argparse.Namespace) -> int:
    from pipeline.demo.train import TrainConfig, train

    m = train(a.out, TrainConfig(seed=a.seed, epochs=a.epochs, n_train=a.n_train, threads=a.threads))
    print(f"saved the model to {a.out}: held-out accuracy {m['heldout_accuracy']['overall']:.3f} "
          f"after {m['train_seconds'] / 60:.1f} min (model card: {Path(a.out) / 'README.md'})")
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from pipeline.embed import embed, place_all

    if a.place:
        try:
            ids = [int(x) for x in a.place.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--place {a.place!r}: give example ids separated by commas, e.g. --place 3,17") from None
        place_all(a.lake, a.run, ids).to_csv(sys.stdout, index=False)
        return 0
    print(embed(a.lake, a.run, n_tokens=a.sample, seed=a.seed, progress=not a.quiet).line())
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    from pipeline.probe import ProbeSpec, probe

    spec = ProbeSpec(target=a.target, selector=a.tokens, source=a.source, folds=a.folds,
                     permutations=a.permutations, seed=a.seed, streams=tuple(a.stream) if a.stream else None)
    summary = probe(a.lake, a.run, spec, progress=not a.quiet)
    print(summary.table())
    print(f"probe {spec.key!r} of run {a.run!r}: {len(summary.rows)} rows in {summary.seconds:.1f} s "
          f"-> {summary.path}")
    return 0


def cmd_intervene(a: argparse.Namespace) -> int:
    from pipeline.extraction.executor import RayError
    from pipeline.intervene.run import intervene

    try:
        s = intervene(a.lake, a.run, a.kind, device=a.device, batch_size=a.batch_size, overwrite=a.overwrite,
                      progress=not a.quiet, ray=a.ray, ray_actors=a.ray_actors, ray_cpus=a.ray_cpus,
                      ablate=a.ablate, streams=a.streams, layers=a.layers, heads=a.heads, estimate=a.estimate,
                      window=a.window, sets=a.sets, regions=a.regions, methods=a.methods, fractions=a.fractions,
                      replace=a.replace, limit=a.limit)
    except KeyboardInterrupt:
        print("\nvlatlas: stopped. Finished chunks are saved; run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RayError as e:
        return _fail(str(e))
    print(s.line())
    return 0


def _port(s: str) -> int:
    try:
        port = int(s)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{s!r} is not a port: give a number from 1 to 65535, or 0 for any free port")
    return port


def _server_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that start the app (only what the user gives, and the local
    defaults their Streamlit configuration leaves unset, reach Streamlit: see :func:`streamlit_command`)."""
    p.add_argument("--port", type=_port, default=None,
                   help="the server's port (default: Streamlit's configuration, STREAMLIT_SERVER_PORT or 8501; "
                        "0: any free port)")
    p.add_argument("--address", default=None,
                   help="the interface the server listens on (default: Streamlit's configuration, "
                        "STREAMLIT_SERVER_ADDRESS or server.address in .streamlit/config.toml, else 127.0.0.1: "
                        "this machine only); 0.0.0.0 serves every interface, so anyone who reaches the port "
                        "can run SQL over the lake and, without --read-only, the run's model on uploads")
    p.add_argument("--read-only", action="store_true",
                   help="no live examples: the app never writes to the lake (for a shared deployment)")
    p.add_argument("--headless", action="store_true", default=None,
                   help="don't open a browser (the default without a terminal)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlatlas", description="Dataset-scale interpretability for "
                                "vision-language transformers: attention and hidden states in a Parquet lake.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("extract", help="run a model over a manifest into the lake")
    e.add_argument("--model", required=True, help="Hugging Face id or local folder (loaded offline if local)")
    e.add_argument("--data", required=True, help="manifest: JSONL, CSV or Parquet with id, image, text")
    e.add_argument("--lake", required=True,
                   help="lake root: a folder (created if missing) or an object-store URI such as s3://bucket/prefix")
    e.add_argument("--run", required=True, help="run name: letters, digits, _ - ., starting with a letter")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--limit", type=int, default=None, help="only the first N manifest rows")
    e.add_argument("--keep-attention", default=None,
                   help="budget:K:P:C (default budget:8:0.9:2: per query row the largest weights up to 90%% of "
                        "its mass, at most 8, plus the 2 largest on the other modality), all, topk:K, mass:P, "
                        "cross or none")
    e.add_argument("--keep-hidden", default=None,
                   help="sample:N (default sample:256: norms of every token, vectors of 256 sampled examples), "
                        "all, none, or layers such as 0,4,12")
    e.add_argument("--workers", type=int, default=None,
                   help="processes that read and encode images ahead of the model (default: from the core count; "
                        "0 = in the main process)")
    e.add_argument("--chunk-size", type=int, default=64, help="examples per resumable chunk")
    e.add_argument("--explain", default=None, metavar="METHODS",
                   help="beyond raw attention, any of relevancy,rollout,value,sinks,lens (comma-separated): "
                        "gradient relevancy of the prediction or of each generated token (ViLT, CLIP, SigLIP, LLaVA) and "
                        "attention rollout (relevancy table), value-weighted attention (value_norms table, *_norm statistics), "
                        "attention sinks (sinks table, sink_mass and *_nosink statistics), the logit lens of a "
                        "decoder LVLM (lens table)")
    e.add_argument("--capture-modules", default=None, metavar="PATTERN[,PATTERN]",
                   help="also store the outputs of the modules whose names (as model.named_modules() names them) "
                        "match, e.g. model.language_model.layers.*.mlp (* one dotted segment, ** any number), in the "
                        "activations table: norms of every token, vectors as --keep-hidden samples them")
    e.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the chunks on a Ray cluster: ADDRESS (HOST:PORT, ray://HOST:10001, auto), or none for "
                        "$RAY_ADDRESS or a cluster running on this machine (else a private local one); the lake must "
                        "be reachable from every node (shared folder or object store)")
    e.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="model-holding actors (default: one per GPU with --device cuda, else cluster CPUs / --ray-cpus)")
    e.add_argument("--ray-cpus", type=float, default=1.0, metavar="C", help="CPUs per Ray actor (default 1)")
    e.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=cmd_extract)

    m = sub.add_parser("embed", help="add openTSNE maps of the hidden states to a run")
    m.add_argument("--lake", required=True)
    m.add_argument("--run", required=True)
    m.add_argument("--sample", type=int, default=None,
                   help="tokens per map, drawn from all examples, stratified by modality (default 5000)")
    m.add_argument("--seed", type=int, default=0, help="seeds the sample and the fit (same seed, same maps)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--place", metavar="EXAMPLE_IDS", default=None,
                   help="instead of fitting: place these examples' tokens (e.g. 3,17) on the finished maps "
                        "of every layer and print them as CSV")
    m.set_defaults(fn=cmd_embed)

    pr = sub.add_parser("probe", help="train linear probes with a control task on a run's stored vectors")
    pr.add_argument("--lake", required=True)
    pr.add_argument("--run", required=True)
    pr.add_argument("--target", required=True, metavar="COLUMN",
                    help="answer, or a manifest column (a key of examples.meta); numeric -> ridge regression "
                         "(r2), else logistic regression (accuracy)")
    pr.add_argument("--tokens", default="image-in-box", metavar="SELECTOR",
                    help="image-in-box (image tokens in the first box), word (the text token naming the box), "
                         "last (the last prompt token) or mean-image (the mean of the image tokens); "
                         "default image-in-box")
    pr.add_argument("--source", default="hidden", metavar="hidden|MODULE",
                    help="hidden (hidden_states) or a captured module's name or pattern (as --capture-modules: * one "
                         "dotted segment, ** any number) in activations; default hidden")
    pr.add_argument("--folds", type=int, default=5, help="k of the k-fold cross-validation grouped by example")
    pr.add_argument("--permutations", type=int, default=20,
                    help="control task: permutations of the labels across examples (p-value resolution 1/(1+P))")
    pr.add_argument("--seed", type=int, default=0, help="seeds the folds and the permutations")
    pr.add_argument("--stream", action="append", default=None, metavar="S",
                    help="only this stream (repeatable; default every stream with vectors)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(fn=cmd_probe)

    iv = sub.add_parser("intervene", help="causal tests over a run's examples: ablate heads, knock out attention "
                                          "edges, remove image regions")
    iv.add_argument("--lake", required=True)
    iv.add_argument("--run", required=True)
    iv.add_argument("--kind", required=True, help="heads, knockout or regions")
    iv.add_argument("--ablate", default=None, help="heads: mean (each head's mean output over the examples; "
                                                  "default) or zero")
    iv.add_argument("--streams", default=None, metavar="S[,S]", help="the streams intervened on (default: every "
                                                                    "stream the kind applies to)")
    iv.add_argument("--layers", default=None, metavar="0,2-3", help="heads: these layers' heads (default all)")
    iv.add_argument("--heads", default=None, metavar="L.H[,L.H]", help="heads: only these heads (exactly, also "
                                                                       "with --estimate)")
    iv.add_argument("--estimate", action="store_true", help="heads: attribution patching, every head of every "
                                                            "example from one forward and one backward pass")
    iv.add_argument("--window", type=int, default=None, help="knockout: layers blocked at once, sliding over the "
                                                             "depth (default 1)")
    iv.add_argument("--sets", default=None, metavar="A->B[,..]", help="knockout: text->image (default), "
                    "generated->image, image->text, last->image")
    iv.add_argument("--regions", default=None, help="regions: ranked (the top p%% of image tokens by each "
                                                    "explanation; default) or boxes (each ground-truth box)")
    iv.add_argument("--methods", default=None, metavar="M[,M]", help="regions ranked: attention, rollout, "
                    "relevancy, value, random (default: every one the run holds, and random)")
    iv.add_argument("--fractions", default=None, metavar="0,0.1,..", help="regions ranked: the fractions of "
                                                                          "the curves (default 0, 0.1, ... 1)")
    iv.add_argument("--replace", default=None, help="regions: pixels (the image's mean colour; default) or "
                                                    "embedding (the mean image-token embedding)")
    iv.add_argument("--limit", type=int, default=None, help="only the examples with example_id below this")
    iv.add_argument("--batch-size", type=int, default=16, help="variants of one example per forward pass")
    iv.add_argument("--device", default="cpu")
    iv.add_argument("--overwrite", action="store_true", help="start this intervention anew")
    iv.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run the chunks on a Ray cluster, as vlatlas extract --ray")
    iv.add_argument("--ray-actors", type=int, default=None)
    iv.add_argument("--ray-cpus", type=float, default=None)
    iv.add_argument("--quiet", action="store_true", help="no progress bar")
    iv.set_defaults(fn=cmd_intervene)

    q = sub.add_parser("sql", help="run a read-only SQL query over the lake's views")
    q.add_argument("--lake", required=True)
    q.add_argument("query", help='e.g. "SELECT * FROM runs"')
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--max-rows", type=int, default=1000)
    q.add_argument("--timeout", type=float, default=30.0, help="seconds before the query is stopped")
    q.set_defaults(fn=cmd_sql)

    s = sub.add_parser("app", help="start the web app on a lake")
    s.add_argument("--lake", required=True)
    _server_options(s)
    s.set_defaults(fn=cmd_app)

    d = sub.add_parser("demo", help="build the demo lake if missing and start the app on it")
    d.add_argument("--lake", default="demo_lake")
    d.add_argument("--n", type=int, default=1000, help="held-out scenes in the demo lake")
    _server_options(d)
    d.add_argument("--rebuild", action="store_true", help="rebuild the demo lake even if it exists")
    d.add_argument("--no-app", action="store_true", help="only build the lake")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)
    dsub = d.add_subparsers(dest="demo_command", metavar="{data,train}")
    dd = dsub.add_parser("data", help="write shapes scenes and a manifest")
    dd.add_argument("--n", type=int, default=1000)
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--out", required=True)
    dd.set_defaults(fn=cmd_demo_data)
    dt = dsub.add_parser("train", help="train the demo model on the shapes world (CPU, ~15 min)")
    dt.add_argument("--out", default=str(Path(__file__).resolve().parent / "demo" / "model"))
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--epochs", type=int, default=20)
    dt.add_argument("--n-train", type=int, default=30_000)
    dt.add_argument("--threads", type=int, default=2)
    dt.set_defaults(fn=cmd_demo_train)
    return p


# the errors a user can cause, by module: looked up only in modules already imported (an error of a
# module never imported cannot have been raised), so that `vlatlas app` does not import torch for them
USER_ERRORS = (("lake.errors", "LakeError"), ("lake.errors", "QueryError"), ("lake.errors", "SandboxError"),
               ("pipeline.data", "ManifestError"), ("pipeline.models", "ModelLoadError"))


def _report(e: BaseException) -> int:
    """Say what went wrong in one sentence on stderr; the exit code."""
    if isinstance(e, _Exit):
        return e.code
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    user = tuple(getattr(sys.modules[m], n) for m, n in USER_ERRORS if m in sys.modules)
    if isinstance(e, (*user, ValueError, FileNotFoundError, NotImplementedError)):
        return _fail(str(e))
    if not isinstance(e, Exception):
        raise e
    if os.environ.get("VLATLAS_DEBUG"):
        raise e
    # a bug: still one sentence, with the way to the traceback
    return _fail(f"unexpected {type(e).__name__}: {e} (set VLATLAS_DEBUG=1 to see the traceback, "
                 "and please report it)")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not getattr(a, "fn", None):
        p.print_help()
        return EXIT_USAGE
    try:
        return a.fn(a)
    except BaseException as e:  # noqa: BLE001 - _report re-raises what is not an error (SystemExit)
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
