"""`lamina generate` and `lamina chat`: one answer, or a conversation, from a model on this machine."""

from __future__ import annotations

from typing import Any

import click

from lamina.cli.common import fail_cleanly, load_llm, model_options, sampling_options, sampling_params
from lamina.errors import LaminaError


@click.command()
@click.argument("prompt")
@model_options
@sampling_options
@click.option("--raw", is_flag=True, help="continue the text as is, without the chat template")
@fail_cleanly
def generate(prompt: str, model: str | None, device: str | None, dtype: str | None, raw: bool, **kw: Any) -> None:
    """Answer PROMPT (a chat turn for chat models; plain continuation with --raw or for base models)."""
    from lamina.errors import InvalidRequestError

    if not prompt.strip():
        raise InvalidRequestError('the prompt is empty: pass some text, e.g. lamina generate "Hello"')
    params = sampling_params(kw)  # validate flags before spending time on loading
    llm = load_llm(model, device, dtype)
    if raw or llm.chat_template is None:
        text = prompt if kw["system"] is None else f"{kw['system']}\n\n{prompt}"
        pieces = llm.stream(text, params)
    else:
        messages = ([{"role": "system", "content": kw["system"]}] if kw["system"] else []) + [{"role": "user", "content": prompt}]
        pieces = llm.stream_chat(messages, params)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@click.command()
@model_options
@sampling_options
@fail_cleanly
def chat(model: str | None, device: str | None, dtype: str | None, **kw: Any) -> None:
    """Talk to a model: streaming answers, history kept; /reset forgets it, /exit (or Ctrl-D) leaves."""
    params = sampling_params(kw)
    llm = load_llm(model, device, dtype)
    system = [{"role": "system", "content": kw["system"]}] if kw["system"] else []
    history: list[dict[str, str]] = []
    click.echo(f"{llm.name} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}). /reset clears the history, /exit leaves.", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history.clear()
            click.echo("(history cleared)", err=True)
            continue
        if text.startswith("/"):
            click.echo(f"unknown command {text!r}; commands: /reset, /exit", err=True)
            continue
        history.append({"role": "user", "content": text})
        answer: list[str] = []
        try:
            for piece in llm.stream_chat(system + history, params):
                answer.append(piece)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [interrupted]", nl=False)
        except LaminaError as e:
            history.pop()
            click.echo(f"error: {e.message}", err=True)
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(answer)})
