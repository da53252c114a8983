"""Constrained decoding: an output that must match a JSON Schema, a regex, a list of choices or a grammar.

A request's `SamplingParams.structured` says what its output must match. Before each of its tokens is drawn,
the tokens that cannot continue a match are masked out of the logits (to minus infinity), so whatever the
sampler then picks keeps the output inside the language; when the language admits nothing more, the request
ends ("stop"). The grammar engine is llguidance (MIT, no dependencies; vLLM, SGLang, llama.cpp and OpenAI
use it): it reads the model's own `tokenizers` JSON, compiles a schema in about a millisecond and computes a
mask over SmolLM2's 49,152 tokens in 10-100 us (see ../shared/reference/TOOLS.md, section 4).

What is built on it here:
- `StructuredOutput`: the request's constraint, checked when it is made. A schema keyword llguidance cannot
  enforce exactly (`uniqueItems`, an unknown `format`, ...) is refused with the keyword and its JSON pointer,
  never silently dropped (the failure users of xgrammar and llama.cpp's GBNF converter report).
- Whitespace between JSON tokens is bounded as llama.cpp's JSON grammars bound it (`space ::= | " " | "\n"{1,2}
  [ \t]{0,20}`), so a small model cannot pad an object with whitespace up to max_tokens.
- `Grammars`: one per model. Its `LLTokenizer` is built once, on a thread started with the model (about
  0.3 s), not lazily on the first request; compiled grammars are kept (LRU), and each sequence gets a copy.
- `Matcher`: one sequence's state. Its mask is computed while the model runs its forward (the engine
  overlaps them: llguidance drops the GIL), then applied before penalties and temperature. A JSON output is
  closed before max_tokens cuts it mid-value, and a string a small model loops in ("2023_2023_...") is
  ended: by its quote where allowed, else by the shortest valid run of one-byte tokens (an email's `@0"`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch

from lamina.errors import InvalidRequestError

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

WHITESPACE = r"( |\n{1,2}[ \t]{0,20})?"
"""What may separate two JSON tokens: nothing, a space, or one or two newlines and an indent of at most 20 (llama.cpp's
`space` rule in json-schema-to-grammar)."""
SAFE_INTEGER = 2**53 - 1
"""Numbers without a bound are held to +-(2**53 - 1), the range in which RFC 8259 (section 6) says integers are
exact in every JSON parser: an answer stays valid, and a model cannot write digits until max_tokens (llama.cpp's
JSON grammars cap integral parts at 16 digits for the same reason)."""
MAX_CHOICES = 1024
CACHED_GRAMMARS = 64


@dataclass(frozen=True)
class StructuredOutput:
    """What an output must match: `kind` and its `value`.

    - json_schema: a JSON Schema (a dict, or its JSON text); json_object: any JSON object (value unused);
    - regex: a regular expression the whole output matches;
    - choice: a list of strings, the output being exactly one of them;
    - grammar: a context-free grammar in Lark syntax (llguidance's, with `%json{...}` for embedded schemas), or in
      GBNF (llama.cpp's and vLLM's; recognised by `::=`), which is converted to Lark.

    `param` names the request field it came from, for the error of a bad one.
    """

    kind: Kind
    value: Any = None
    param: str = "response_format"
    grammar: str = field(init=False, repr=False, compare=False)
    """llguidance's serialised grammar (built and checked on construction)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grammar", _compile(self.kind, self.value, self.param))

    @property
    def schema(self) -> dict | None:
        """The JSON Schema, for json_schema and json_object."""
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind == "json_schema":
            return self.value if isinstance(self.value, dict) else json.loads(self.value)
        return None


_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames", "unevaluatedProperties")


def _rewrite(schema: Any, node: Any) -> Any:
    """`schema` with `node` applied to every subschema, innermost first (through the keywords that hold schemas)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _rewrite(v, node) for k, v in out[key].items()}
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_rewrite(v, node) for v in out[key]]
    for key in _ONE:
        if key in out:
            out[key] = [_rewrite(v, node) for v in out[key]] if isinstance(out[key], list) else _rewrite(out[key], node)
    return node(out)


def closed(schema: Any) -> Any:
    """`schema` with every object schema that leaves `additionalProperties` unsaid closed to other keys (OpenAI's
    strict mode, and what the SDKs' pydantic helpers send)."""
    def close(out: dict[str, Any]) -> dict[str, Any]:
        if ("properties" in out or out.get("type") == "object") and "additionalProperties" not in out and "patternProperties" not in out:
            out["additionalProperties"] = False
        return out

    return _rewrite(schema, close)


def bounded_numbers(schema: Any) -> Any:
    """`schema` with every integer or number schema that has no upper (lower) bound given `SAFE_INTEGER` as one."""
    def bound(out: dict[str, Any]) -> dict[str, Any]:
        types = out.get("type")
        numeric = types in ("integer", "number") or (isinstance(types, list) and bool({"integer", "number"} & set(types)))
        if numeric and "enum" not in out and "const" not in out:
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = SAFE_INTEGER
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = -SAFE_INTEGER
        return out

    return _rewrite(schema, bound)


def _compile(kind: str, value: Any, param: str) -> str:
    import llguidance as llg

    def bad(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, param=param)

    if kind in ("json_schema", "json_object"):
        schema: Any = {"type": "object"} if kind == "json_object" else value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise bad(f"the JSON schema is not valid JSON ({e})") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise bad(f"a JSON schema is an object, not {type(schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(bounded_numbers(schema), defaults={"whitespace_pattern": WHITESPACE})
        except (ValueError, TypeError) as e:
            raise bad(f"the JSON schema cannot be read: {e}") from None
        _check(grammar, lambda message: bad(_schema_message(message, schema)))
        return grammar
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad("regex must be a non-empty string")
        grammar = llg.LLMatcher.grammar_from_regex(value)
        _check(grammar, lambda message: bad(f"the regex {value!r} cannot be used: {message}"))
        return grammar
    if kind == "choice":
        if (not isinstance(value, list | tuple) or not value or len(value) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise bad(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(value))
        grammar = llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        _check(grammar, lambda message: bad(f"the choices cannot be used: {message}"))
        return grammar
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise bad("grammar must be a non-empty string (Lark, or GBNF with ::=)")
        lark = value
        if "::=" in value:
            from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

            try:
                lark = gbnf_to_lark(value)
            except GbnfToLarkError as e:
                raise bad(f"the GBNF grammar cannot be read: {e}") from None
        grammar = llg.LLMatcher.grammar_from_lark(lark)
        _check(grammar, lambda message: bad(f"the grammar cannot be used: {message}"))
        return grammar
    raise bad(f"unknown kind of structured output {kind!r}")


def _check(grammar: str, error: Any) -> None:
    import llguidance as llg

    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise error(messages[0] if messages else "invalid")


def _schema_message(message: str, schema: dict) -> str:
    """llguidance's complaint about a schema, with the JSON pointer of each keyword it names."""
    keys = re.findall(r'"([^"]+)"', message) if message.startswith("Unimplemented keys") else []
    if message.startswith("Unknown format"):
        keys = ["format"]
    where = [f"'{k}' at {_pointer(schema, k) or '#'}" for k in keys]
    if where:
        return (f"the JSON schema uses {', '.join(where)}, which Lamina cannot enforce exactly while generating "
                f"({message}); remove the keyword, or check it on the result")
    return f"the JSON schema cannot be enforced: {message}"


def _pointer(node: Any, key: str, path: str = "#") -> str | None:
    """The JSON pointer of the first object in `node` that has `key` (depth first), or None."""
    if isinstance(node, dict):
        if key in node:
            return path
        for k, v in node.items():
            found = _pointer(v, key, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}")
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _pointer(v, key, f"{path}/{i}")
            if found:
                return found
    return None


class Grammars:
    """The model's grammar compiler: its llguidance tokenizer, built on a thread from the start, and compiled
    grammars by text (each sequence gets a copy of one)."""

    def __init__(self, tokenizer_json: str, eos_id: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        """The model's: logits beyond the tokenizer's vocabulary are always masked."""
        self._eos_id = eos_id
        self._tokenizer: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        threading.Thread(target=self._build, args=(tokenizer_json,), name="lamina-grammar-tokenizer", daemon=True).start()

    def _build(self, tokenizer_json: str) -> None:
        try:
            import llguidance as llg

            self._tokenizer = llg.LLTokenizer(tokenizer_json, eos_token=self._eos_id)
        except BaseException as e:  # kept, and raised to the first request that needs it
            self._error = e
        finally:
            self._ready.set()

    @property
    def tokenizer(self) -> Any:
        self._ready.wait()
        if self._error is not None:
            raise InvalidRequestError(f"structured outputs are unavailable for this model's tokenizer: {self._error}",
                                      param="response_format")
        return self._tokenizer

    def check(self, structured: StructuredOutput) -> None:
        """Compile `structured` for this tokenizer (any thread), raising the error a request deserves."""
        self._template(structured)

    def matcher(self, structured: StructuredOutput) -> Matcher:
        """A fresh matcher at the start of `structured`'s language."""
        # Only JSON closes early: in a grammar with free text (a tool call under auto) a quote or a brace is text.
        json = self.json_vocab if structured.kind in ("json_schema", "json_object") else None
        return Matcher(self._template(structured).deep_copy(), self.tokenizer.vocab_size, self.vocab_size, json)

    @cached_property
    def json_vocab(self) -> JsonVocab:
        """The vocabulary's tables a JSON matcher uses (built once, on the first JSON request: ~50 ms)."""
        tok = self.tokenizer
        token_bytes = [tok.decode_bytes([i]) for i in range(tok.vocab_size)]
        closers = np.array([bool(b) and not b.strip(b'"]}') for b in token_bytes], dtype=bool)
        if 0 <= self._eos_id < len(closers):
            closers[self._eos_id] = True
        single = {b: i for i, b in enumerate(token_bytes) if len(b) == 1}
        escape = None
        if b'"' in single:
            escape = single[b'"'], [single[c] for c in (b"@", b".", b"-", b":", b"/", b"_", b"0", b"1", b"a", b"A", b"T",
                                                        b"Z", b"+", b" ") if c in single]
        return JsonVocab(token_bytes, closers, np.array([b[:1] == b'"' for b in token_bytes], dtype=bool),
                         np.array([bool(b) and not b.strip(b" \t\n\r") for b in token_bytes], dtype=bool), escape)

    def _template(self, structured: StructuredOutput) -> Any:
        import llguidance as llg

        with self._lock:
            template = self._compiled.get(structured.grammar)
            if template is not None:
                self._compiled.move_to_end(structured.grammar)
                return template
        template = llg.LLMatcher(self.tokenizer, structured.grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"the {structured.kind.replace('_', ' ')} cannot be used with this model: "
                                      f"{template.get_error()}", param=structured.param)
        with self._lock:
            self._compiled[structured.grammar] = template
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return template


@dataclass(frozen=True)
class JsonVocab:
    """What a JSON matcher knows of the vocabulary, by token id."""

    token_bytes: list[bytes]
    """Each token's bytes (scanned to know whether the output is inside a string)."""
    closers: np.ndarray
    """bool: the tokens that only close what is open (made of `"`, `]` and `}`), and the end of sequence."""
    quoted: np.ndarray
    """bool: the tokens that begin with a quote (inside a string, the only closers)."""
    blanks: np.ndarray
    """bool: the tokens made only of JSON whitespace (a closing output skips them)."""
    escape: tuple[int, list[int]] | None
    """The lone quote's token, and the one-byte tokens tried in order to reach a point where a string may close
    (the separators formats are made of, a digit, letters); None without a lone quote token."""


class Matcher:
    """One sequence's place in its grammar: the mask of the tokens that may come next, and the tokens taken.

    A JSON matcher (given the `JsonVocab`) also guards against a small model's loop inside a string
    ("2023_2023_2023_...", "example.email.example.email..."), which would otherwise run to max_tokens and leave
    the output cut mid-value: once the string's last `LOOP_TOKENS` tokens repeat with a period of at most
    `LOOP_PERIOD`, the string is closed where its grammar allows a quote; where it does not yet (a format or a
    pattern still unmet), by the shortest run of one-byte tokens after which it may (`_escape_path`); failing
    that, every token that would extend a repeat of `REPEAT_TOKENS` tokens is masked (DRY's rule, as a hard
    mask) until the string ends. Loops outside strings are left alone: an array of zeros is data.
    """

    LOOP_TOKENS = 32
    LOOP_PERIOD = 16
    REPEAT_TOKENS = 4
    ESCAPE_DEPTH = 12
    ESCAPE_WIDTH = 256

    def __init__(self, matcher: Any, tokenizer_vocab: int, model_vocab: int, json: JsonVocab | None = None) -> None:
        self._m = matcher
        self._vocab = tokenizer_vocab
        self._model_vocab = model_vocab
        self._mask = np.zeros((tokenizer_vocab + 31) // 32, dtype=np.int32)
        self._fresh = False
        self._json = json
        """Set for JSON outputs, which close early and break loops; None for other grammars (a tool call under
        auto), where a quote or a brace is text."""
        self.closing = False
        """Whether the budget ran low and the output was closed early (its finish reason is then `length`)."""
        self.loops_broken = 0
        """How many looping strings the guard ended."""
        self._string: list[int] | None = None
        """The tokens of the JSON string being written (None outside strings)."""
        self._escaped = False
        self._looping = False
        self._forced: list[int] = []
        """The tokens that end the open string, found by `_escape_path`, still to be taken."""
        self._escape_tried = False
        """Whether `_escape_path` ran for the open string (a search that found nothing is not run again)."""

    def fill(self) -> None:
        """Compute the mask of the next token (drops the GIL: the engine runs it beside the forward)."""
        if not self._fresh:
            self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            self._fresh = True

    def apply(self, logits: torch.Tensor, closing: bool = False) -> torch.Tensor:
        """`logits` (vocab,) float32 with every token the grammar forbids at minus infinity (a new tensor).

        `closing` (the token budget is nearly spent): where the grammar allows a token that only closes (a
        string's quote, `]`, `}`, the end), keep to those, so that the output ends complete and valid instead
        of being cut mid-value; where it allows none (a required key still to write), whitespace is left out
        where anything else is allowed. A looping string is ended as the class says."""
        self.fill()
        allowed = np.unpackbits(self._mask.view(np.uint8), count=self._vocab, bitorder="little").astype(bool)
        json = self._json
        if json is not None:
            if not self._looping and self._string is not None and self._loops():
                self._looping = True
                self.loops_broken += 1
            if self._looping or closing:
                # inside a string only a quote closes (a `}` there is text: an email's local part may hold one)
                ends = allowed & json.closers & (json.quoted if self._string is not None else True)
                if ends.any():
                    allowed = ends
                    self._forced = []
                    self.closing |= closing and not self._looping
                else:
                    if self._string is not None and not self._forced and not self._escape_tried:
                        self._escape_tried = True
                        self._forced = self._escape_path()
                    if self._forced and allowed[self._forced[0]]:
                        allowed = np.zeros_like(allowed)
                        allowed[self._forced[0]] = True
                        self.closing |= closing and not self._looping
                    elif self._looping:
                        allowed = self._unrepeated(allowed)
                    if closing and (allowed & ~json.blanks).any():
                        allowed = allowed & ~json.blanks
        out = logits.detach().to(torch.float32, copy=True).cpu()
        values = out.numpy()
        np.copyto(values[: self._vocab], -np.inf, where=~allowed)  # (4x faster than putmask here)
        if self._model_vocab > self._vocab:
            values[self._vocab :] = -np.inf
        return out.to(logits.device)

    def _loops(self) -> bool:
        """Whether the open string's last LOOP_TOKENS tokens repeat with a period of at most LOOP_PERIOD."""
        s, n = self._string, self.LOOP_TOKENS
        if s is None or len(s) < n:
            return False
        tail = s[-n:]
        return any(all(tail[i] == tail[i - p] for i in range(p, n)) for p in range(1, self.LOOP_PERIOD + 1))

    def _escape_path(self) -> list[int]:
        """The shortest run of one-byte tokens (from the escape alphabet, breadth first, at most ESCAPE_DEPTH long
        and ESCAPE_WIDTH wide) after which the open string may take its closing quote, the quote included; []
        if none is found. What ends an email's local part: `@0"`. Checked by llguidance without moving the
        matcher (about a microsecond a check)."""
        if self._json is None or self._json.escape is None:
            return []
        quote, alphabet = self._json.escape
        frontier: list[list[int]] = [[]]
        for _ in range(self.ESCAPE_DEPTH):
            grown: list[list[int]] = []
            for seq in frontier:
                for token in alphabet:
                    candidate = [*seq, token]
                    if self._m.validate_tokens(candidate) < len(candidate):
                        continue
                    if self._m.validate_tokens([*candidate, quote]) == len(candidate) + 1:
                        return [*candidate, quote]
                    grown.append(candidate)
                if len(grown) >= self.ESCAPE_WIDTH:
                    break
            frontier = grown[: self.ESCAPE_WIDTH]
            if not frontier:
                break
        return []

    def _unrepeated(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` without the tokens that would extend a repeat of REPEAT_TOKENS tokens within the open string
        (unchanged if that would leave nothing)."""
        s, k = self._string or [], self.REPEAT_TOKENS
        if len(s) < k:
            return allowed
        suffix = s[-k:]
        banned = {s[j] for j in range(k, len(s)) if s[j - k : j] == suffix}
        if not banned:
            return allowed
        out = allowed.copy()
        out[[t for t in banned if t < self._vocab]] = False
        return out if out.any() else allowed

    def _scan(self, token: int) -> None:
        """Follow whether the output is inside a JSON string (quotes and backslash escapes)."""
        if self._json is None or not 0 <= token < len(self._json.token_bytes):
            return
        if self._string is not None:
            self._string.append(token)
        for byte in self._json.token_bytes[token]:
            if self._string is not None:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # the closing quote
                    self._string, self._looping = None, False
            elif byte == 0x22:
                self._string, self._escape_tried = [], False

    def advance(self, token: int) -> bool:
        """Take `token`; False if the grammar did not allow it (the matcher is then in error)."""
        self._fresh = False
        if self._forced:
            self._forced = self._forced[1:] if token == self._forced[0] else []
        self._scan(token)
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar admits no more tokens: the output is complete."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return str(self._m.get_error())
