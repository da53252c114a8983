"""Choosing a replica for a request: prefix-cache affinity with a load guard (the `cache_aware` policy of
vllm-router and sglang's gateway, and Ray Serve LLM's PrefixCacheAffinityRouter), or plain round robin.

Each replica's engine keeps a prefix cache, so a request whose prompt starts like one a replica served lately
is cheaper there: its shared prefix is not computed again. The router remembers, per replica, the prompts it
sent there as hashes of their leading blocks (`BLOCK` characters each, chained, so that block k stands for
the whole prefix up to it, as vLLM's prefix-cache block hashes do), a bounded LRU per replica. For a new
request it finds the replica holding the longest run of the prompt's leading blocks:

- if that match covers at least `match` (0.3) of the prompt, the request goes there;
- otherwise to the replica with the fewest requests in flight, and among those the one that remembers the
  fewest blocks (the smallest tree, as sglang's gateway does): new prefixes spread over the replicas;
- but when the busiest replica has more than `balance_abs` requests above the idlest *and* more than
  `balance_rel` times its load, balance wins: the least-loaded replica takes it, whatever the match.

What the router routes on is the request's text as the model would start to read it: the messages' roles and
contents in order (chat), the prompt (completions), the instructions and input (responses).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

Policy = Literal["prefix", "round_robin"]
BLOCK = 64
"""Characters per prefix block."""
MAX_BLOCKS = 64
"""Blocks hashed per prompt (the first 4,096 characters)."""
MEMORY = 50_000
"""Block hashes remembered per replica (least recently used forgotten)."""


def routing_text(body: Any) -> str:
    """The text a request's prompt begins with (see the module docstring); empty for anything else."""
    if not isinstance(body, dict):
        return ""
    parts: list[str] = []
    if isinstance(body.get("instructions"), str):
        parts.append(body["instructions"])
    for field in ("messages", "input"):
        value = body.get(field)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for m in value:
                if isinstance(m, dict):
                    content = m.get("content")
                    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True) if content else ""
                    parts.append(f"<{m.get('role', m.get('type', ''))}>{text}")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list) and prompt:
        parts.append(prompt[0] if isinstance(prompt[0], str) else json.dumps(prompt[0]))
    return "\n".join(parts)


def block_hashes(text: str) -> list[bytes]:
    """Chained hashes of the text's leading full blocks: hash k covers text[: BLOCK * (k + 1)]."""
    out, h = [], b""
    for k in range(min(len(text) // BLOCK, MAX_BLOCKS)):
        h = hashlib.blake2b(h + text[k * BLOCK:(k + 1) * BLOCK].encode("utf-8", "surrogatepass"), digest_size=12).digest()
        out.append(h)
    return out


class PrefixRouter:
    def __init__(self, replicas: int, policy: Policy = "prefix", *, match: float = 0.3, balance_abs: int = 32,
                 balance_rel: float = 1.5) -> None:
        if replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.replicas, self.policy = replicas, policy
        self.match, self.balance_abs, self.balance_rel = match, balance_abs, balance_rel
        self._seen: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(replicas)]
        self._next = itertools.cycle(range(replicas))

    def choose(self, text: str, loads: Sequence[int]) -> int:
        """The replica for a request whose prompt begins with `text`, given each replica's requests in flight;
        the choice is remembered (its blocks become that replica's)."""
        if self.policy == "round_robin":
            return next(self._next)
        blocks = block_hashes(text)
        # the least loaded, and among equals the one that remembers least (the smallest tree, as sglang's)
        idlest = min(range(self.replicas), key=lambda i: (loads[i], len(self._seen[i]), i))
        busiest = max(loads)
        if busiest - loads[idlest] > self.balance_abs and busiest > self.balance_rel * loads[idlest]:
            chosen = idlest
        else:
            best, run = idlest, 0
            for i, seen in enumerate(self._seen):
                n = 0
                while n < len(blocks) and blocks[n] in seen:
                    n += 1
                if n > run or (n == run and n > 0 and loads[i] < loads[best]):
                    best, run = i, n
            covered = run * BLOCK / max(1, len(text))
            chosen = best if run and covered >= self.match else idlest
        self._remember(chosen, blocks)
        return chosen

    def _remember(self, replica: int, blocks: list[bytes]) -> None:
        seen = self._seen[replica]
        for h in blocks:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > MEMORY:
            seen.popitem(last=False)
