"""Shell completion (`eval "$(_SUPERVISE_COMPLETE=bash_source supervise)"`): click completes the command it is
run on, and `supervise` is three commands behind one entry point — the run form, `check` and `ctl VERB` (cli.main).
When the words typed so far start with `check` or `ctl`, completion is run on a group of those two instead."""

from __future__ import annotations

import os

import click

COMPLETE_VAR = "_SUPERVISE_COMPLETE"  # click's name for the variable of the prog `supervise`


def complete_subcommand(run: click.Command) -> None:
    """During completion of `supervise check …` or `supervise ctl …`: complete there and exit; otherwise return
    (the run form completes itself when it is called)."""
    words, at = os.environ.get("COMP_WORDS", "").split(), os.environ.get("COMP_CWORD", "")
    # bash and zsh give the index of the word being completed; fish gives the word itself
    past = int(at) >= 2 if at.isdigit() else len(words) > 2 or (len(words) == 2 and not at)
    if COMPLETE_VAR not in os.environ or len(words) < 2 or words[1] not in ("check", "ctl") or not past:
        return
    from .check import check_command
    from .control.client import ctl

    group = click.Group("supervise", commands={"check": check_command(run), "ctl": ctl})
    group.main(args=[], prog_name="supervise", complete_var=COMPLETE_VAR)
