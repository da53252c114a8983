"""The `lamina` command: thin verbs over the library, and the composition root that wires the layers.

Every verb parses its flags, calls library functions, and prints. Errors Lamina raises on purpose
(`LaminaError`) are printed as one line, `error: <what is wrong and how to fix it>`, with exit status 2;
anything else is a bug and keeps its traceback.

One module per family of verbs; this one only builds the top group and adds each command to it, here and
nowhere else (importing a module registers nothing):

    common.py    shared options, the one-line error report, loading a model, the progress bar, sizes
    generate.py  generate, chat                 serve.py     serve, keys, usage
    rag.py       ingest, ask, eval retrieval    data.py      data ingest|list|show|sql
    train.py     tokenizer train, pretrain, evaluate
    finetune.py  finetune sft|dpo|classify, lora merge
    gan.py       gan train|sample, experiment digits
    info.py      info, models                agent.py     agent, mcp list|serve
    batch.py     batch create|list|get|cancel|results (against a running server)
"""

from __future__ import annotations

import click

from lamina.cli.agent import agent, mcp_group
from lamina.cli.batch import batch_group
from lamina.cli.common import CONTEXT_SETTINGS
from lamina.cli.data import data_group
from lamina.cli.finetune import finetune, lora_group
from lamina.cli.gan import experiment, gan
from lamina.cli.generate import chat, generate
from lamina.cli.info import info, models
from lamina.cli.rag import ask, eval_group, ingest
from lamina.cli.serve import keys, serve, usage
from lamina.cli.train import evaluate, pretrain, tokenizer


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lamina")
def cli() -> None:
    """Lamina: a six-layer generative-AI stack (infra, arch, foundation, llm, api, apps) on plain PyTorch."""


for command in (generate, chat, serve, keys, usage, ingest, ask, eval_group, data_group, models, info, tokenizer,
                pretrain, evaluate, finetune, lora_group, gan, experiment, agent, mcp_group, batch_group):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="lamina")
