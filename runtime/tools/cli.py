"""The `mamba2-aot` command line: a lazy click group of built-in and plugin commands.

Built-in commands are listed in BUILTIN_COMMANDS (name -> "module:attr", imported on use).
Other packages add commands through the entry-point group `mamba2_aot.commands`; they are
listed by name and imported only when invoked. Errors: a Mamba2AOTError, or an OSError the
environment causes (a full disk, permissions, a read-only file system, the file-size or
open-file limits), prints `error: <message>` and exits 2; anything unexpected prints a
one-line internal error and exits 1 (set MAMBA2_AOT_DEBUG=1 for the traceback, with the
wrapped library's own). Warnings (Mamba2AOTWarning) print as one `warning: <message>` line each.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings

import click

from runtime import __version__
from runtime.environment import environment_problem
from runtime.errors import Mamba2AOTError, Mamba2AOTWarning

PLUGIN_GROUP = "mamba2_aot.commands"
# name -> ("module:attr", short help shown by --help without importing the module)
BUILTIN_COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("runtime.tools.inspect_cmd:inspect_command", "Show what an artifact contains and where it runs."),
    "generate": ("runtime.tools.generate_cmd:generate_command", "Generate from an artifact plus weights."),
    "convert-weights": ("runtime.tools.convert_cmd:convert_command", "Write an artifact's weights as an orbax checkpoint."),
    "serve": ("runtime.serve.cli:serve_command", "Serve an artifact over an OpenAI-compatible HTTP API."),
}


def _debug() -> bool:
    return os.environ.get("MAMBA2_AOT_DEBUG", "") not in ("", "0")


def _plugins() -> dict[str, str]:
    """{name: "module:attr"} from installed entry points; broken metadata is skipped."""
    from importlib.metadata import entry_points

    try:
        return {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    except Exception:  # noqa: BLE001 - a broken distribution must not break the CLI
        return {}


def _load(name: str, target: str) -> click.Command:
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - ImportError, missing attribute, broken plugin
        if _debug():
            traceback.print_exc()
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Mamba2AOTError(
            f"command {name!r} is unavailable ({target}: {reason}): "
            "install its optional dependencies, e.g. pip install 'mamba2-aot[export]'"
        ) from e
    if not isinstance(obj, click.Command):
        raise Mamba2AOTError(f"command {name!r} ({target}) is not a click command: reinstall the package providing it")
    return obj


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def _targets(self) -> dict[str, tuple[str, str]]:
        found = {name: (target, f"(plugin: {target.partition(':')[0]})") for name, target in _plugins().items()}
        found.update(BUILTIN_COMMANDS)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self._targets()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        target = self._targets().get(name)
        return None if target is None else _load(name, target[0])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Like click's, but short help for unloaded commands comes from the table, not an import."""
        targets = self._targets()
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit=formatter.width - 6 - len(name))))
            else:
                rows.append((name, targets[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from runtime.format.compat import jax_version

    try:
        jax = f" (jax {jax_version()})"
    except Mamba2AOTError:
        jax = " (jax not installed)"
    click.echo(f"mamba2-aot {__version__}{jax}")
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def cli() -> None:
    """Compile Mamba-2 models ahead of time with jax.export and run the artifacts."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _fail(message: str, code: int) -> None:
    if _debug():
        traceback.print_exc()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _warning_printer(previous):
    """warnings.showwarning for the CLI: a Mamba2AOTWarning is one `warning:` line (once);
    other warnings are shown as Python shows them."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, Mamba2AOTWarning):
            return previous(message, category, filename, lineno, file, line)
        text = _one_line(str(message))
        if text not in shown:
            shown.add(text)
            print(f"warning: {text}", file=sys.stderr)

    return show


def _quiet_unraisablehook(unraisable) -> None:
    """Drop a library callback's stray traceback (MAMBA2_AOT_DEBUG=1 shows them)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`mamba2-aot`)."""
    if not _debug():  # the CLI owns its process: libraries' own noise stays off the terminal
        import logging

        logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax's absl ERROR lines
        # Exceptions raised in libraries' native callbacks (tensorstore's "Event loop is closed"
        # after orbax's failed read, many per failure, before and after the error line) are
        # "unraisable": nothing catches them, sys.unraisablehook prints them.
        sys.unraisablehook = _quiet_unraisablehook
    with warnings.catch_warnings():
        warnings.simplefilter("always", Mamba2AOTWarning)
        # jax's own line per unreadable compile-cache entry: the runtime says it once instead
        warnings.filterwarnings("ignore", r"Error (reading|writing) persistent compilation cache", UserWarning)
        warnings.showwarning = _warning_printer(warnings.showwarning)
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="mamba2-aot", standalone_mode=False)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()  # usage errors look as click shows them (exit 2)
        sys.exit(e.exit_code)
    except Mamba2AOTError as e:
        _fail(str(e), 2)
    except BrokenPipeError:
        # e.g. `mamba2-aot inspect X | head`: stop quietly, as a filter should
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into one line
        problem = environment_problem(e)
        if problem is not None:  # a full disk, permissions, limits: the user's to fix
            _fail(problem, 2)
        if _debug():
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set MAMBA2_AOT_DEBUG=1 for a traceback)", 1)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


if __name__ == "__main__":
    main()
