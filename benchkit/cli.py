"""The `benchkit` command. Exit status: 0 ok, 1 some cell failed, 2 bad input or usage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from benchkit.errors import BadInput
# Standard library only, both: the console script imports this module before main() runs.
from benchkit.interrupt import SigintWatch
from benchkit.text import printable

if TYPE_CHECKING:  # torch is imported inside the commands that need it, as elsewhere in this module
    import torch

EXIT_OK, EXIT_CELL_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report a Ctrl-C
# --device: unset means the suite's eval.device, else auto (an explicit flag beats the suite).
DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2 with one line, as bad input does
        command = self.prog.removeprefix("benchkit").strip()   # '' for the top level, 'run' for `benchkit run`
        print(f"benchkit: error: {command + ': ' if command else ''}{printable(message)} "
              f"(see `{printable(self.prog)} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def best_device() -> "torch.device":
    """The fastest device this machine has: cuda, else mps (Apple silicon), else cpu."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def local_device(flag: str | None, suite_device: str | None) -> "torch.device":
    """The device for models in this process: --device if given, else the suite's eval.device,
    else auto (`best_device`). A device this machine lacks is BadInput in one line, naming where
    it was asked for."""
    import torch

    name, where = (flag, "--device") if flag else (suite_device, "eval.device") if suite_device else ("auto", "")
    if name == "auto":
        return best_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"{where} {name}: no CUDA device is available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadInput(f"{where} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput(f"{where} {name}: no MPS device is available on this machine")
    return device


def device_label(device: "torch.device") -> str:
    """The device as the run's header names it, e.g. 'cuda:0 (NVIDIA H200)'."""
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def cmd_run(args: argparse.Namespace) -> int:
    import sqlite3

    from benchkit import outdir, resolve
    from benchkit.store import Store, files

    resolved = resolve.load(args.suite, seed=args.seed)   # --seed: error bars, one folder per seed
    suite = resolved.suite
    _require_assets(resolved)
    default_out = Path("runs") / suite.suite if args.seed is None else Path("runs") / suite.suite / f"seed{args.seed}"
    out = Path(args.out or default_out)
    # Before any model is built: an --out that cannot be written, one another run is writing, or a
    # results.sqlite that is not a benchkit store is one line, and nothing is touched.
    with outdir.claim(out, "--out") as claimed:
        db = out / "results.sqlite"
        if args.fresh:
            if db.is_dir():
                raise BadInput(f"{db}: a folder, not a results file: --fresh removes only files; move it away")
            for f in files(db):
                f.unlink(missing_ok=True)
        new, store = not db.exists(), None
        try:
            store = Store(db)
            store.interrupt_stale_runs()   # we hold the lock: a run still marked running has died
            return _run_locked(args, resolved, out, store)
        except BadInput:
            if new and store is not None and not store.runs():   # refused before storing anything: no trace
                store.close()
                store = None
                claimed.discard(files(db))
            raise
        except (OSError, sqlite3.Error) as exc:
            if not outdir.is_disk_full(exc):
                raise
            try:
                if store is not None:
                    store.interrupt_stale_runs()   # this run, unless it had finished before the disk filled
            except sqlite3.Error:
                pass   # the next run on this folder marks it
            where = getattr(exc, "filename", None) or db
            raise BadInput(f"{where}: disk full; the committed shards are kept: free space and rerun to resume") \
                from None
        finally:
            if store is not None:
                store.close()


def _run_locked(args: argparse.Namespace, resolved, out: Path, store) -> int:
    """The run itself, its output folder locked and its store open (cmd_run)."""
    from benchkit import provenance, report, runner
    from benchkit.suite import resolved_dict, stable_hash

    suite = resolved.suite
    if args.executor == "ray":
        from benchkit.executors.ray import RayExecutor, cluster_device

        # The models live on the cluster: auto means its GPUs if it has any, whatever the driver has.
        device = cluster_device(args.device, suite.eval.device)
        where = f"{device_label(device) if device.type != 'cuda' else 'cuda'} on the Ray cluster"
        executor = RayExecutor(resolved, device)
        # The models live on the cluster; the driver only needs the datasets' sizes to plan.
        datasets = {c.spec.model_dump_json(): c.build() for c in (resolved.dataset, resolved.split) if c}
        sizes = {c.key: len(datasets[c.dataset.model_dump_json()]) for c in resolved.cells}
    else:
        from benchkit.executors.local import LocalExecutor

        device = local_device(args.device, suite.eval.device)
        where = device_label(device)
        comps = resolved.build(device)
        executor = LocalExecutor(resolved, comps)
        sizes = {c.key: len(comps.dataset(c)) for c in resolved.cells}
    suite_json = resolved_dict(suite)
    prov = provenance.collect(device, stable_hash(suite_json), suite.seed, resolved) | {"executor": args.executor}

    def announce(plans) -> None:
        todo = sum(len(p.shards) for p in plans)
        clean = sum(p.cell.kind == "clean" for p in plans)
        extra = f" + standard accuracy of {clean} group(s) on the whole split" if clean else ""
        print(f"benchkit: {suite.suite}: {len(plans) - clean} cells{extra}, {todo} shard(s) to compute -> {printable(str(out))} "
              f"(device: {where})", file=sys.stderr)

    try:
        outcome = runner.run(resolved, store, executor, sizes=sizes, limit=args.limit, provenance=prov,
                             suite_json=suite_json, announce=announce)
    except KeyboardInterrupt:
        print("benchkit: interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130
    data = report.collect(store, outcome.run_id)
    print(report.table(data))
    for line in report.check_advice(data):
        print(f"benchkit: {line}", file=sys.stderr)
    html = report.render_html(data, out / "leaderboard.html")
    for f in outcome.failures:
        print(f"benchkit: cell failed: {printable(f)}", file=sys.stderr)
    print(f"leaderboard: {printable(str(html.resolve()))}")
    return EXIT_CELL_FAILED if outcome.failures else EXIT_OK


def _require_assets(resolved) -> None:
    """Every declared file present before anything runs; else the checklist of missing ones."""
    from benchkit.assets import checklist

    if lines := checklist([item for item in resolved.assets() if not item[2].exists()]):   # one line per file
        raise BadInput([f"{len(lines)} file(s) missing; nothing was run (`benchkit assets SUITE --download` fetches "
                        "what is published for download; or set BENCHKIT_HOME or the params' path):"]
                       + lines)


def cmd_assets(args: argparse.Namespace) -> int:
    from benchkit import resolve
    from benchkit.assets import checklist

    suites = [(path, resolve.load(path).assets()) for path in args.suites]   # every suite checked before any download
    if args.download:
        from benchkit.download import download_all

        for path, items in suites:
            if not items:
                print(f"{printable(str(path))}: no files needed beyond the installed packages")
        download_all([item for _, items in suites for item in items])   # BadInput: one line per file still missing
        return EXIT_OK
    missing = {}
    for path, items in suites:
        for line in checklist(items) or [f"{path}: no files needed beyond the installed packages"]:
            print(printable(line))
        missing |= {p: asset for _, asset, p in items if not p.exists()}
    if not missing:
        return EXIT_OK
    auto = sum(1 for a in missing.values() if a.url or a.archive)
    manual = len(missing) - auto
    fetch = f"`benchkit assets {' '.join(args.suites)} --download` fetches"
    if not manual:
        what = f"{fetch} them"
    elif auto:
        what = f"{fetch} {auto}; {manual} need a manual step (see where each is published)"
    else:
        what = "none has a download address: get each from where it is published"
    raise BadInput(f"{len(missing)} file(s) missing: {what}")


def cmd_validate(args: argparse.Namespace) -> int:
    from benchkit import resolve

    problems = []
    for path in args.suites:
        try:
            r = resolve.load(path)
            print(f"{printable(str(path))}: ok ({sum(c.kind == 'attack' for c in r.cells)} cells)")
        except BadInput as exc:
            problems.extend(exc.problems)
    if problems:
        raise BadInput(problems)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from benchkit import registry

    kinds = [args.kind] if args.kind else [*registry.kinds(), "suites"]
    for kind in kinds:
        print(f"{kind}:")
        if kind == "suites":
            suites = _suites(args.dir)
            width = max((len(str(path)) for path, _ in suites), default=0)
            for path, description in suites:
                print(f"  {printable(str(path)):{width}s}  {printable(description)}")
            continue
        entries = list(registry.get(kind))
        width = max((len(e.id) for e in entries), default=0)
        for e in entries:
            print(f"  {e.id:{width}s}  {e.description}  [{e.plugin}]")
    print("(benchkit describe ID: a component's parameters and defaults)")
    return EXIT_OK


def _suites(folder: str | None) -> list[tuple[Path, str]]:
    """The suites of a folder (default: the shipped ones, runnable by name), each with the start of
    its description (90 characters)."""
    from benchkit import suite_yaml
    from benchkit.suite import shipped

    if folder and not Path(folder).is_dir():
        raise BadInput(f"--dir {folder}: not a folder")
    paths = sorted(Path(folder).glob("*.yaml")) if folder else shipped()
    out = []
    for path in paths:
        try:   # the suite reader's limits hold here too: a hostile file in --dir is one note, not a crash
            text = suite_yaml.read(path).data.get("description") or ""
        except (BadInput, OSError):
            text = "(cannot be read: `benchkit validate` says why)"
        text = " ".join(str(text).split())
        out.append((path if folder else Path(path.stem), text if len(text) <= 90 else text[:89] + "…"))
    return out


def cmd_describe(args: argparse.Namespace) -> int:
    """A component's parameters with types, defaults and descriptions, from its params model."""
    import difflib

    from tabulate import tabulate

    from benchkit import registry
    from benchkit.params import describe_fields

    kinds = [args.kind] if args.kind else list(registry.kinds())
    entries = [registry.get(k).entries[args.id] for k in kinds if args.id in registry.get(k)]
    if not entries:
        known = sorted({e.id for k in kinds for e in registry.get(k)})
        close = difflib.get_close_matches(args.id, known, n=1, cutoff=0.6)
        raise BadInput(f"describe: no component '{args.id}'" + (f"; did you mean '{close[0]}'?" if close
                                                                 else " (benchkit ls lists them)"))
    for i, e in enumerate(entries):
        print(("\n" if i else "") + f"{e.id} ({e.kind[:-1]}, plugin {e.plugin}): {e.description}")
        if doc := " ".join((e.params.__doc__ or "").split()):
            print(doc)
        if e.kind == "defenses":
            from benchkit.defended import supported_modes

            modes = ("depend on the params" if callable(e.gradient_modes) else
                     "declared when built" if e.gradient_modes is None else ", ".join(supported_modes(e.gradient_modes)))
            print(f"gradient modes: {modes}")
        rows = [[r["name"], r["type"], _default(r["default"]), r["description"]] for r in describe_fields(e.params)]
        print(tabulate(rows, headers=["parameter", "type", "default", "description"], disable_numparse=True,
                       maxcolwidths=[None, 30, 24, 70]) if rows else "no parameters")
    return EXIT_OK


def _default(value) -> str:
    # Budgets are written as papers write them: 8/255 rather than 0.0313725...
    if isinstance(value, float) and not value.is_integer() and abs(value * 255 - round(value * 255)) < 1e-9:
        return f"{round(value * 255)}/255"
    return value if isinstance(value, str) else repr(value)


def cmd_plugins(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from benchkit.plugins import plugin_info

    rows = [[p["name"], p["distribution"] or "-", p["version"] or "-", ", ".join(p["hooks"])] for p in plugin_info()]
    print(tabulate(rows, headers=["plugin", "package", "version", "hooks"]))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from benchkit import report
    from benchkit.store import Store

    if (args.dir is None) == (args.index is None):
        raise BadInput("report: give a run folder DIR or --index PARENT_DIR (not both)")
    if args.html:   # its folder made (or the one line why not) before anything is read
        from benchkit.outdir import prepare_file

        prepare_file(Path(args.html), "--html")
    if args.index is not None:
        if not Path(args.index).is_dir():
            raise BadInput(f"--index {args.index}: not a folder")
        from benchkit import index

        idx = index.index(Path(args.index))
        if not idx["runs"]:
            raise BadInput(idx["skipped"] + [f"--index {args.index}: no readable results.sqlite under this folder"])
        for line in idx["skipped"]:
            print(f"benchkit: left out of the index: {printable(line)}", file=sys.stderr)
        print(index.index_table(idx, args.format))
        if args.html:
            print(f"index: {printable(str(index.render_index(idx, Path(args.html)).resolve()))}", file=sys.stderr)
        return EXIT_OK
    db = Path(args.dir) / "results.sqlite"
    if not db.exists():
        raise BadInput(f"{args.dir}: no results.sqlite here (run `benchkit run SUITE --out {args.dir}` first)")
    store = Store.read_only(db)   # a snapshot in memory: the folder is never written
    try:
        data = report.collect(store)
    finally:
        store.close()
    print(report.table(data, args.format))
    if args.format == "table":
        for line in report.check_advice(data):
            print(f"benchkit: {line}", file=sys.stderr)
    if args.html:
        print(f"leaderboard: {printable(str(report.render_html(data, Path(args.html)).resolve()))}", file=sys.stderr)
    return EXIT_OK


def cmd_purify(args: argparse.Namespace) -> int:
    """Purify image files with one defense of a suite (built alone, not the whole suite)."""
    import difflib

    import torch

    from benchkit import outdir, png, resolve
    from benchkit.noise import PerExampleNoise, derive_seed

    resolved = resolve.load(args.suite)
    suite = resolved.suite
    ids = [d.id for d in suite.defenses]
    if args.defense not in ids:
        close = difflib.get_close_matches(args.defense, ids, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f" (defined: {', '.join(ids)})"
        raise BadInput(f"{args.suite}: --defense: no defense '{args.defense}' in this suite{hint}")
    images, problems = [], []
    for path in map(Path, args.inputs):
        try:
            a = png.decode(path.read_bytes())
        except (OSError, png.PNGError) as exc:
            problems.append(f"{path}: cannot read image: {exc.strerror if isinstance(exc, OSError) else exc}")
            continue
        a = a[:, :, :-1] if a.shape[2] in (2, 4) else a              # drop alpha
        images.append((path, torch.from_numpy(a.transpose(2, 0, 1).astype("float32") / 255.0)[None]))
    if (shape := _image_shape(resolved)) is not None:
        for path, x in images:
            if tuple(x.shape[1:]) != shape:
                problems.append(f"{path}: the image is {_shape_text(tuple(x.shape[1:]))}, but defense "
                                f"'{args.defense}' of {args.suite} works on {_shape_text(shape)} images (the suite's "
                                f"{suite.dataset.plugin} data): convert and resize it first")
    stems = [p.stem for p, _ in images]
    problems += [f"{p}: another input is also named {p.stem}.png; outputs would overwrite each other"
                 for p, _ in images if stems.count(p.stem) > 1]
    out = Path(args.out)
    if problem := outdir.folder_problem(out, f"--out {out}"):   # made now: no defense is built for nothing
        problems.append(problem)
    if problems:
        raise BadInput(problems)
    comp = resolved.defenses[args.defense]
    where = f"{args.suite}: {comp.where}"
    try:
        purifier = comp.build()
    except (BadInput, FileNotFoundError) as exc:
        raise BadInput([f"{where}: {p}" for p in getattr(exc, "problems", [str(exc)])]) from None
    device = local_device(args.device, suite.eval.device)
    purifier = purifier.to(device).eval()
    for path, x in images:
        noise = PerExampleNoise([derive_seed(args.seed, path.name)])
        try:
            with torch.no_grad():
                y = purifier.purify(x.to(device), gradient="none", noise=noise)[0]
        except Exception as exc:  # noqa: BLE001 - one line per image, e.g. a channel count the model rejects
            first = (str(exc).strip().splitlines() or [""])[0]
            problems.append(f"{path}: defense '{args.defense}' failed on this {x.shape[1]}-channel "
                            f"{x.shape[2]}x{x.shape[3]} image: {type(exc).__name__}: {first}")
            continue
        target = out / f"{path.stem}.png"
        target.write_bytes(png.from_tensor(y))
        print(printable(str(target)))
    if problems:
        raise BadInput(problems)
    return EXIT_OK


def _image_shape(resolved) -> tuple[int, int, int] | None:
    """(C, H, W) of the suite's images, which its defenses are built for; None when the dataset
    cannot be built here (e.g. its files are absent): the defense then judges the input itself."""
    from benchkit.errors import MissingAsset

    try:
        return tuple(resolved.dataset.build().get([0])[0].shape[1:])
    except (BadInput, MissingAsset, FileNotFoundError, OSError):
        return None


def _shape_text(shape: tuple[int, int, int]) -> str:
    channels = {1: "grey", 3: "RGB"}.get(shape[0], f"{shape[0]}-channel")
    return f"{channels} {shape[1]}x{shape[2]}"


def _positive_limit(text: str) -> int:
    """--limit N: a whole number of images, at least 1 (0 or less would run nothing and say ok).
    BadInput, not argparse's ArgumentTypeError: it passes through parse_args to main's one line
    (`--limit 0: ...`), as other flags' bad values do, without the usage block."""
    try:
        n = int(text)
    except ValueError:
        raise BadInput(f"--limit {text}: not a whole number; give the number of images to evaluate") from None
    if n < 1:
        raise BadInput(f"--limit {text}: must be a positive number of images")
    return n


def build_parser() -> argparse.ArgumentParser:
    from benchkit import registry
    from benchkit.plugins import get_plugin_manager

    parser = _Parser(prog="benchkit", description="Adversarial-robustness benchmarks around diffusion purification.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run a suite (resumes from the output folder)")
    p.add_argument("suite")
    p.add_argument("--out", help="output folder (default runs/<suite name>)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process; ray: (cell, shard) tasks on the Ray cluster at RAY_ADDRESS, else a local one")
    p.add_argument("--device", choices=DEVICE_CHOICES,
                   help="where the models run (default: the suite's eval.device, else auto: cuda if available, "
                        "else mps, else cpu)")
    p.add_argument("--limit", type=_positive_limit, help="only the first N images (N >= 1)")
    p.add_argument("--seed", type=int, help="override the suite's seed (default output runs/<suite>/seed<N>; "
                                            "`report --index runs/<suite>` then gives mean ± std over seeds)")
    p.add_argument("--fresh", action="store_true", help="discard stored results in the output folder")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="resolve every plugin id and params; run nothing")
    p.add_argument("suites", nargs="+")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("assets", help="checklist of the checkpoints and data files suites need; --download fetches them")
    p.add_argument("suites", nargs="+")
    p.add_argument("--download", action="store_true",
                   help="fetch every missing file that has a download address into the path the run expects "
                        "(resumes partial downloads, checks published digests); name the others' manual step")
    p.set_defaults(func=cmd_assets)
    p = sub.add_parser("ls", help="list registered components and suites")
    p.add_argument("kind", nargs="?", choices=[*registry.kinds(), "suites"])
    p.add_argument("--dir", help="with 'suites': list this folder's suites (default: the shipped ones, "
                                 "which `benchkit run NAME` finds from any folder)")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("describe", help="a component's parameters: types, defaults, descriptions")
    p.add_argument("id", help="a component id, as `benchkit ls` lists them")
    p.add_argument("--kind", choices=list(registry.kinds()), help="only this kind (when ids collide across kinds)")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("plugins", help="installed plugins, versions and hooks")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("report", help="print a stored run's leaderboard, or an index of the runs in a folder")
    p.add_argument("dir", nargs="?")
    p.add_argument("--index", metavar="PARENT_DIR", help="index every run folder (results.sqlite) under PARENT_DIR: "
                   "each defense's worst case over its attacks, and mean ± std over seeds of runs whose "
                   "configuration matches")
    p.add_argument("--html", help="also write the HTML leaderboard (or, with --index, the index page) here")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("purify", help="purify PNG images with one defense of a suite")
    p.add_argument("--suite", required=True, help="the suite YAML that defines the defense")
    p.add_argument("--defense", required=True, help="the defense's id in that suite")
    p.add_argument("inputs", nargs="+", metavar="IN", help="PNG files (8-bit grey, RGB or RGBA; alpha is dropped)")
    p.add_argument("--out", required=True, help="output folder: OUT/<name>.png per input")
    p.add_argument("--device", choices=DEVICE_CHOICES,
                   help="where the defense runs (default: the suite's eval.device, else auto: cuda if available, "
                        "else mps, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the defense's randomness (per image: seed + file name)")
    p.set_defaults(func=cmd_purify)
    get_plugin_manager().hook.register_commands(cli=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    with SigintWatch() as sigint:
        return _main(argv, sigint)


def _main(argv: list[str] | None, sigint: SigintWatch) -> int:
    try:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:   # --help (0) or a usage error (2, its line printed): a status, as the rest
            return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        status = int(args.func(args) or 0)
        sys.stdout.flush()   # inside the try: a closed pipe found at exit would escape as a traceback
        return status
    except BadInput as exc:
        for line in exc.problems:
            print(f"benchkit: error: {printable(line)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader left (`report --format json | head`): what it took was what it wanted. Point
        # stdout at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - a full disk and an interrupt are answered here; the rest re-raised
        if isinstance(exc, SystemExit):
            raise
        from benchkit import outdir

        if outdir.is_disk_full(exc):   # sqlite's 'database or disk is full', ENOSPC: nothing stored is lost
            print(f"benchkit: error: {printable(outdir.disk_full_line(exc))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        # Ctrl-C anywhere else (parsing, loading plugins, a command's `import torch`): nothing was
        # computed yet or it is already stored; `run` says so itself when interrupted mid-run.
        if isinstance(exc, KeyboardInterrupt) or sigint.seen:
            print("benchkit: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise


if __name__ == "__main__":
    sys.exit(main())
