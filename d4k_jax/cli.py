"""What every command-line entry point shares: how it starts and how it fails.

`cli.run(main)` replaces `absl.app.run(main)`:
- Errors a user can fix (a bad path, value, size or config field, a full disk) end the program with one
  `error: ...` line on stderr that names the value and what was expected, and exit status 2, with no
  traceback. `--verbose` (or D4K_TRACEBACK=1) re-raises them with the traceback.
- Libraries' INFO logs (orbax, grain, TFDS, jax) stay off the console; d4k_jax's own INFO lines and
  everyone's warnings stay. `--verbose` brings the libraries' INFO logs back.
- An unknown `--config.a.b=...` field is named with the fields that exist at that level, instead of the
  AttributeError ml_collections raises while the flags are parsed.
- The project's GPU XLA options (d4k_jax/xla_flags.py) join XLA_FLAGS before JAX starts a backend.

`use_compilation_cache(config.compilation_cache)`, first thing in a CLI's main: compiled programs are kept
on disk (JAX's persistent compilation cache), so a rerun, a resumed run or sampling after training reads
them back instead of compiling again.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from d4k_jax import xla_flags

EXIT_USER_ERROR = 2

# Exceptions whose message is for the user (the code raises them with the bad value and what was expected).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes conversion's ConversionError
    FileNotFoundError,  # includes metrics' MissingWeights
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,  # d4k_jax.distributed: a coordinator that does not answer
)
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_OURS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("d4k_jax", "conversion", "tools"))


class _LibraryInfoFilter(logging.Filter):
    """Lets through warnings and errors from anywhere, and INFO / DEBUG only from this project's code."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(_OURS)


def quiet_libraries(quiet: bool = True) -> None:
    """Keep (or, with quiet=False, stop keeping) libraries' INFO logs off the console."""
    handler = absl_logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _LibraryInfoFilter)]:
        handler.removeFilter(f)
    if quiet:
        handler.addFilter(_LibraryInfoFilter())


def message(e: BaseException) -> str | None:
    """The one-line message for an error a user can fix, or None for anything else (a bug: traceback)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        where = f" writing {e.filename}" if e.filename else ""
        return (
            f"the disk is full or a file size limit was reached{where} ({os.strerror(e.errno)}); free space and rerun"
        )
    if isinstance(e, USER_ERRORS):
        text = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        return text or type(e).__name__
    return None


def config_field_error(argv: Sequence[str], config_flag: str = "config") -> str | None:
    """For a `--config.a.b=v` that names no field of the loaded config: the message naming it and the
    fields that exist there. None when every override names a field (or the config cannot be read)."""
    config = flags.FLAGS[config_flag].value if config_flag in flags.FLAGS else None
    if config is None:
        try:
            config = _load_config(argv, config_flag)
        except Exception:
            return None
    prefix = f"--{config_flag}."
    for arg in argv[1:]:
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix) :].partition("=")[0]
        node, done = config, []
        for name in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if name not in keys:
                where = f"under {prefix}{'.'.join(done)}" if done else f"in {prefix[2:-1]}"
                return f"unknown config field {prefix}{path}: no {name!r} {where}; the fields there are {sorted(keys)}"
            node, done = node[name], [*done, name]
    return None


def _load_config(argv: Sequence[str], config_flag: str):
    import importlib.util

    spec = next(a.partition("=")[2] for a in argv if a.startswith(f"--{config_flag}="))
    file, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_d4k_config", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _fail(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def default_compilation_cache() -> str:
    """The configs' default `compilation_cache`: JAX's own JAX_COMPILATION_CACHE_DIR when it is set (so that
    setting it keeps working, as the tests do), else $XDG_CACHE_HOME/d4k_jax/jax_cache (~/.cache by default):
    one cache per user, shared by every run and both CLIs, as pip's or torch's."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "d4k_jax" / "jax_cache")


def use_compilation_cache(path: str) -> None:
    """Keep compiled programs in `path` (`~` expanded) from now on; empty: no persistent cache at all. Call it
    before anything compiles: JAX opens its cache at the first compile and never again.

    Only programs that took at least JAX's jax_persistent_cache_min_compile_time_secs (1 s; the environment
    variable JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets it) are written, so the many tiny programs do not
    fill the folder. On GPU, XLA's per-fusion autotuning results go there too (JAX's default
    jax_persistent_cache_enable_xla_caches). Entries are keyed by the program, the devices, the jax/jaxlib
    version and the XLA flags: a change in any of them compiles again, it never reads a wrong program."""
    import jax

    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def run(main: Callable[[list[str]], object], config_flag: str | None = "config") -> None:
    """absl's app.run(main) with the user-error and logging behaviour in this module's docstring."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "show libraries' INFO logs, and tracebacks for user errors")
    started = False

    def guarded(argv):
        nonlocal started
        started = True
        quiet_libraries(not flags.FLAGS.verbose)
        return main(argv)

    quiet_libraries()
    xla_flags.apply()
    try:
        app.run(guarded)
    except (AttributeError, KeyError):  # ml_collections, while parsing a --config.a.b override
        field = None if started or config_flag is None else config_field_error(sys.argv, config_flag)
        if field is None or _traceback_wanted():
            raise
        _fail(field)
    except Exception as e:
        text = message(e)
        if text is None or _traceback_wanted():
            raise
        _fail(text)


def _traceback_wanted() -> bool:
    if os.environ.get("D4K_TRACEBACK"):
        return True
    try:
        return bool(flags.FLAGS.verbose)
    except flags.UnparsedFlagAccessError:  # the error came while the flags were parsed
        return "--verbose" in sys.argv
