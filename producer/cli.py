"""The ``crackq`` command: one console script for every role.

Sub-commands live next to the code they drive (``producer/``, ``worker/``,
``training/``) and are imported only when invoked, so ``crackq status`` does
not pay for importing TensorFlow.
"""

from __future__ import annotations

import importlib

import click

#: command name -> "module:attribute" of a click command.
COMMANDS = {
    "submit": "producer.commands:submit",
    "status": "producer.commands:status",
    "wait": "producer.commands:wait",
    "results": "producer.commands:results",
    "cancel": "producer.commands:cancel",
    "run": "producer.commands:run",
    "settings": "producer.commands:settings",
    "dead-letters": "producer.commands:dead_letters",
    "samples": "producer.samples:samples",
    "worker": "worker.cli:worker",
    "train": "training.cli:train",
    "evaluate": "training.cli:evaluate",
    "export": "training.cli:export",
    "domain-fit": "training.domain_fit:domain_fit",
    "tiles": "producer.tiles_cli:tiles",
    "label": "producer.label_cli:label",
    "adapt": "training.adapt_cli:adapt",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:  # a role not installed / not built yet
            reason = str(exc)  # ``exc`` itself is unbound once the except block ends

            @click.command(name=name, help=f"(unavailable: {reason})")
            def unavailable():
                raise click.ClickException(f"command {name!r} is unavailable: {reason}")
            return unavailable


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crackq")
def main():
    """crackq: find cracks in concrete imagery with a pool of queue workers."""


if __name__ == "__main__":  # pragma: no cover
    main()
