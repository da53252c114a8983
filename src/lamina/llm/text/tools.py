"""Tool calling: tools into the prompt, a grammar that makes every call valid, and calls parsed back out, streaming.

OpenAI's contract (../shared/reference/TOOLS.md, section 1): a request lists `tools` (JSON Schema parameters)
and a `tool_choice` (none, auto, required, or one named function); the answer is text, calls, or both; each
call has an id, a name and its arguments as JSON text; streamed, a call's id and name come first, then its
arguments in fragments whose concatenation is the final arguments.

How a model sees tools depends on its chat template, so each template gets a `ToolFormat`:
- `hermes`: the template renders `tools` itself and asks for `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  blocks (Qwen2.5, Hermes 2/3; vLLM's `hermes` parser);
- `llama3_json`: the template renders `tools` and asks for one `{"name": ..., "parameters": ...}` object as the
  whole answer (Llama 3.1/3.2; vLLM's `llama3_json`);
- `smollm2`: the template ignores tools (SmolLM2's does: it loops over role and content only), so Lamina puts them
  in a system turn itself, in the format SmolLM2 was tuned on and Ollama's `smollm2` template uses: a JSON list of
  calls in one `<tool_call>[...]</tool_call>` block, results coming back as `<tool_response>` user turns. Chosen
  over llama.cpp's generic `{"tool_call": ...} | {"response": ...}` wrapper because that wraps every plain answer in
  JSON too, a format this model never saw.

Which applies is found by rendering the template with a probe tool (as llama.cpp does) and reading its text.

The grammar does the real work (`grammar`): under `required` and a named choice the output can only be calls to
the listed functions with arguments that validate against their schemas; under `auto` the output is free text,
calls, or text then calls, and once a call starts it is constrained the same way; `parallel_tool_calls: false`
allows one call. `ToolStream` turns the text into content and call deltas as it arrives, holding back only text
that could begin a call, and passing argument text through exactly as generated (never a re-serialised partial
JSON, the bug vLLM's hermes parser had).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lamina.errors import InvalidRequestError
from lamina.llm.engine.grammar import WHITESPACE, StructuredOutput, closed

MAX_TOOLS = 128
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
FormatName = Literal["hermes", "llama3_json", "smollm2"]
_ALPHABET = string.ascii_letters + string.digits
_PROBE = "lamina_probe_tool_4f2a"


def call_id() -> str:
    """OpenAI's shape: `call_` and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        """As chat templates and the tools prompt show it: OpenAI's `{"type": "function", "function": {...}}`."""
        fn: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text, exactly as generated."""
    id: str = field(default_factory=call_id)


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None
    """The function a `function` choice names."""


def tools_from_openai(tools: Sequence[Mapping[str, Any]] | None, param: str = "tools") -> list[Tool]:
    """`Tool`s from OpenAI's request shape (`{"type": "function", "function": {...}}`, or the flat shape of the
    Responses API), checked: at most 128, names of [a-zA-Z0-9_-]{1,64}, unique, parameter schemas that compile."""
    out: list[Tool] = []
    for i, t in enumerate(tools or []):
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or (isinstance(t, Mapping) and t.get("type", "function") != "function"):
            raise InvalidRequestError(f"{param}[{i}] must be a function tool ({{'type': 'function', 'function': {{...}}}})", param=param)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidRequestError(f"{param}[{i}]: the function name {name!r} must be 1-64 letters, digits, _ or -", param=param)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise InvalidRequestError(f"{param}[{i}] ({name}): parameters must be a JSON Schema object", param=param)
        strict = bool(fn.get("strict", t.get("strict", False) if isinstance(t, Mapping) else False))
        out.append(Tool(name, str(fn.get("description") or ""), dict(params), strict))
    if len(out) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools per request, not {len(out)}", param=param)
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise InvalidRequestError(f"two tools are named {t.name!r}: tool names must be unique", param=param)
        seen.add(t.name)
    for i, t in enumerate(out):  # every schema must be enforceable, so a call can always be made valid
        try:
            StructuredOutput("json_schema", _arguments_schema(t), param=param)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{param}[{i}] ({t.name}): {e.message}", param=param) from None
    return out


def tool_choice_from_openai(choice: Any, tools: Sequence[Tool], param: str = "tool_choice") -> ToolChoice:
    """OpenAI's `tool_choice` (none|auto|required|{"type": "function", "function": {"name": ...}}, or the
    Responses API's {"type": "function", "name": ...}); the default is auto with tools and none without."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice must be none, auto, required or a named function, not {choice!r}", param=param)
        if choice != "none" and not tools:
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools", param=param)
        return ToolChoice(choice)  # type: ignore[arg-type]
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        fn = choice.get("function", choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in {t.name for t in tools}:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools", param=param)
        return ToolChoice("function", name)
    raise InvalidRequestError("tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}", param=param)


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    """The schema a call's arguments are held to: the tool's parameters, with objects that leave
    `additionalProperties` unsaid closed (a function takes the arguments it declares; OpenAI's strict mode does
    the same, and a small model otherwise invents extra keys)."""
    return closed(dict(tool.parameters) or {"type": "object", "properties": {}})


def _call_schema(tools: Sequence[Tool], key: str) -> dict[str, Any]:
    """One call to any of `tools`: {"name": <const>, key: <its parameters>}, names first (so a stream knows it early)."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, key: _arguments_schema(t)},
                "required": ["name", key], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_pattern": WHITESPACE}}


# --- formats ----------------------------------------------------------------------------------------------------


class ToolFormat:
    """How tools reach one family of templates, and how its calls look."""

    name: FormatName
    key = "arguments"
    """The arguments' key in a call object."""
    open_tag: str | None = "<tool_call>"
    close_tag = "</tool_call>"
    template_renders_tools = True
    block_per_call = True
    """Parallel calls come as one tagged block each (else as one list in one block)."""

    def messages(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool]) -> tuple[list[dict[str, Any]], list[dict] | None]:
        """The conversation and `tools` argument for the chat template."""
        return [_template_message(m) for m in messages], [t.as_openai() for t in tools] or None

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> StructuredOutput | None:
        """What the output may be: under `auto` text, calls, or text then calls (a call, once its tag is out, is
        constrained like the others); under `required` and a named function, calls only."""
        if choice.mode == "none" or not tools:
            return None
        chosen = [t for t in tools if t.name == choice.name] if choice.mode == "function" else list(tools)
        many = parallel and choice.mode != "function"
        body = self._call_body(chosen, many)
        more = f'(/{_ws()}/ "{self.open_tag}" {body})*' if many and self.block_per_call else ""
        if choice.mode == "auto":
            lark = (f"start: TEXT | opening {body} {more}\n"
                    f"opening[lazy]: /(.|\\n)*/ \"{self.open_tag}\"\n"
                    f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(self.open_tag or '')}(.|\\n)*/\n")
        else:
            lark = f'start: "{self.open_tag}" {body} {more}\n'
        return StructuredOutput("grammar", lark, param="tools")

    def _call_body(self, tools: Sequence[Tool], many: bool) -> str:
        """What follows the opening tag of one call: the call object, the closing tag."""
        return f'/{_ws()}/ %json {json.dumps(_call_schema(tools, self.key))} /{_ws()}/ "{self.close_tag}"'


def _ws() -> str:
    return WHITESPACE.replace("/", "\\/")


class Hermes(ToolFormat):
    name = "hermes"


class Llama3Json(ToolFormat):
    name = "llama3_json"
    key = "parameters"
    open_tag = None

    def grammar(self, tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> StructuredOutput | None:
        """One call object is the whole answer (the template knows one call per turn); under `auto` an answer
        that does not begin with "{" is text (llguidance's own Llama 3.1 example)."""
        if choice.mode == "none" or not tools:
            return None
        chosen = [t for t in tools if t.name == choice.name] if choice.mode == "function" else list(tools)
        call = f"%json {json.dumps(_call_schema(chosen, self.key))}"
        lark = f"start: TEXT | {call}\nTEXT: /[^{{](.|\\n)*/\n" if choice.mode == "auto" else f"start: {call}\n"
        return StructuredOutput("grammar", lark, param="tools")


SMOLLM2_TOOLS_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. Based on "
    "the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the "
    "functions can be used, answer the question directly in plain text.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "To call tools, the output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct.\n"
    '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "... (more tool calls as required)\n]</tool_call>"
)
"""The tools system turn for templates without tools: the APIGen-style prompt of SmolLM2's function-calling
data and of Ollama's smollm2 template, with plain answers allowed (`auto`)."""


class SmolLM2(ToolFormat):
    name = "smollm2"
    template_renders_tools = False
    block_per_call = False

    def messages(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool]) -> tuple[list[dict[str, Any]], list[dict] | None]:
        out: list[dict[str, Any]] = []
        for m in messages:
            role, content = m.get("role"), _text(m.get("content"))
            if role == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _arguments_value(c["function"].get("arguments"))}
                         for c in m["tool_calls"]]
                text = (content + "\n" if content else "") + "<tool_call>" + json.dumps(calls, ensure_ascii=False) + "</tool_call>"
                out.append({"role": "assistant", "content": text})
            elif role == "tool":
                block = f"<tool_response>\n{content}\n</tool_response>"
                if out and out[-1].get("_tool_turn"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool_turn": True})
            else:
                out.append({"role": role, "content": content})
        for m in out:
            m.pop("_tool_turn", None)
        if tools:
            listing = json.dumps([t.as_openai() for t in tools], ensure_ascii=False)
            prompt = SMOLLM2_TOOLS_PROMPT.format(tools=listing)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + prompt).strip()}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, None

    def _call_body(self, tools: Sequence[Tool], many: bool) -> str:
        array = {"type": "array", "items": _call_schema(tools, self.key), "minItems": 1,
                 "x-guidance": {"whitespace_pattern": WHITESPACE}}
        if not many:
            array["maxItems"] = 1
        return f'%json {json.dumps(array)} "{self.close_tag}"'


FORMATS: dict[str, type[ToolFormat]] = {"hermes": Hermes, "llama3_json": Llama3Json, "smollm2": SmolLM2}


def detect_format(render: Any) -> ToolFormat:
    """The format for a template, from how it renders a probe tool: `render(messages, tools)` -> text."""
    probe = Tool(_PROBE, "probe", {"type": "object", "properties": {}})
    try:
        text = render([{"role": "user", "content": "hi"}], [probe.as_openai()])
    except InvalidRequestError:
        text = ""
    if _PROBE not in text:
        return SmolLM2()
    if "<tool_call>" in text:
        return Hermes()
    if '"parameters"' in text and ("ipython" in text or '{"name"' in text):
        return Llama3Json()
    return Hermes()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def _arguments_value(arguments: Any) -> Any:
    """Arguments as templates want them: a dict (OpenAI sends JSON text; templates apply `tojson` or `items`)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def _template_message(m: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(m)
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                              "function": {"name": c["function"]["name"], "arguments": _arguments_value(c["function"].get("arguments"))}}
                             for c in m["tool_calls"]]
    if m.get("role") in ("tool", "user", "system") or m.get("content") is not None:
        out["content"] = _text(m.get("content"))
    return out


def check_tool_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Every `role: tool` message answers a call made earlier in the conversation (by `tool_call_id`)."""
    made: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            if isinstance(c, Mapping) and c.get("id"):
                made.add(str(c["id"]))
        if m.get("role") == "tool":
            cid = m.get("tool_call_id")
            if not cid:
                raise InvalidRequestError(f"messages[{i}]: a tool message needs the tool_call_id of the call it answers",
                                          param="messages")
            if cid not in made:
                raise InvalidRequestError(f"messages[{i}]: tool_call_id {cid!r} answers no tool call made earlier in the conversation",
                                          param="messages")


# --- streaming --------------------------------------------------------------------------------------------------


@dataclass
class CallDelta:
    """A piece of a streamed call: `index`; on its first piece `id` and `name`; then `arguments` fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolStream:
    """Splits an output into content and call deltas as its text arrives (`push`, then `finish`)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self._pos = 0
        """Characters of `text` dealt with: sent as content, or read as part of a call."""
        self._calls: list[ToolCall] = []
        self._scan: _CallScanner | None = None
        self._closing: str | None = None
        """The closing tag still to be passed over after a call."""
        self._content_started = False
        self._call_from = -1
        """Where the call being read began in `text` (its opening tag)."""

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    @property
    def unfinished(self) -> str:
        """The text of a call still open at `finish` (cut short by max_tokens): a non-streamed answer keeps it as content."""
        return self.text[self._call_from :] if self._scan is not None and self._call_from >= 0 else ""

    def push(self, piece: str) -> tuple[str, list[CallDelta]]:
        """The content that is certainly content, and the call deltas, that the next piece of text completes."""
        self.text += piece
        content: list[str] = []
        deltas: list[CallDelta] = []
        text = self.text
        while self._pos < len(text):
            if self._scan is not None:
                deltas += self._scan.feed(text[self._pos])
                self._pos += 1
                if self._scan.done:
                    self._calls += self._scan.calls
                    self._scan = None
                    self._closing = self.fmt.close_tag if self.fmt.open_tag else None
                continue
            if self._closing is not None:
                rest = text[self._pos :]
                stripped = rest.lstrip()
                if stripped.startswith(self._closing):
                    self._pos += len(rest) - len(stripped) + len(self._closing)
                    self._closing = None
                    continue
                if not stripped or self._closing.startswith(stripped):
                    break  # the tag may still be arriving
                self._closing = None
                continue
            start = self._call_start()
            if start is None:
                end = len(text) - self._held_back()
                if end > self._pos:
                    content.append(text[self._pos : end])
                    self._content_started = True
                    self._pos = end
                break
            if text[self._pos : start].strip():  # (the space before or between calls is not content)
                content.append(text[self._pos : start])
                self._content_started = True
            self._call_from = start
            self._pos = start + len(self.fmt.open_tag or "")
            self._scan = _CallScanner(self.fmt.key, many=isinstance(self.fmt, SmolLM2), first_index=len(self._calls))
        return "".join(content), deltas

    def finish(self) -> str:
        """The content left at the end of the output: held-back text that began no call is content after all (a
        call cut short by max_tokens stays as streamed)."""
        if self._scan is not None or self._closing is not None:
            self._closing = None
            self._pos = len(self.text)
            return ""
        rest = self.text[self._pos :]
        self._pos = len(self.text)
        return "" if self._calls and not rest.strip() else rest

    def _call_start(self) -> int | None:
        tag = self.fmt.open_tag
        if tag is None:  # llama3_json: a call is the whole answer, an object from its first character on
            if self._content_started or self._calls:
                return None
            body = self.text[self._pos :].lstrip()
            return len(self.text) - len(body) if body.startswith("{") else None
        i = self.text.find(tag, self._pos)
        return None if i < 0 else i

    def _held_back(self) -> int:
        """How many trailing characters might begin a call, and so are not content yet."""
        tag = self.fmt.open_tag
        tail = self.text[self._pos :]
        if self._calls and (tag or "").startswith(tail.lstrip()):  # space after a call, or the start of another
            return len(tail)
        if tag is None:
            return len(tail) if not self._content_started and not self._calls and not tail.strip() else 0
        for n in range(min(len(tag) - 1, len(tail)), 0, -1):
            if tag.startswith(tail[-n:]):
                return n
        return 0


def split_calls(fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
    """The content and the calls of a whole answer (a call cut short by max_tokens stays in the content)."""
    stream = ToolStream(fmt)
    content, _ = stream.push(text)
    return content + stream.finish() + stream.unfinished, stream.calls


class _CallScanner:
    """Reads one JSON call object (or, `many`, a JSON list of them) a character at a time, reporting each call's
    name as soon as its string ends and then the raw text of its arguments value as it comes."""

    def __init__(self, key: str, many: bool, first_index: int) -> None:
        self.key = key
        self.calls: list[ToolCall] = []
        self.done = False
        self._obj = 2 if many else 1
        """The depth of call objects."""
        self._index = first_index
        self._depth = 0
        self._in_str = self._esc = False
        self._start_call()

    def _start_call(self) -> None:
        self._expect: str | None = "key"
        self._key: str | None = None
        self._key_buf: str | None = None
        self._val_buf: str | None = None
        self._args_on = False
        self._args = ""
        self._ws = ""
        self._pending = ""
        self._name: str | None = None
        self._id: str | None = None

    def feed(self, ch: str) -> list[CallDelta]:
        out: list[CallDelta] = []
        if self._in_str:
            self._string_char(ch, out)
            return out
        at_obj = self._depth == self._obj
        if self._args_on:
            if at_obj and ch in ",}":
                self._args_on, self._ws = False, ""
            elif at_obj and ch.isspace():
                self._ws += ch  # after the value: not part of it unless more of it follows
                return out
            else:
                self._emit(self._ws + ch, out)
                self._ws = ""
        elif at_obj and self._expect == "value" and self._key == self.key and not ch.isspace():
            self._args_on, self._expect = True, None
            self._emit(ch, out)
        if ch == '"':
            self._in_str = True
            if at_obj and not self._args_on:
                if self._expect == "key":
                    self._key_buf = ""
                elif self._expect == "value":
                    self._val_buf = ""
        elif ch in "{[":
            self._depth += 1
            if ch == "{" and self._depth == self._obj:
                self._start_call()
        elif ch in "}]":
            self._depth -= 1
            if ch == "}" and self._depth == self._obj - 1:
                self._end_call(out)
            if self._depth <= 0:
                self.done = True
        elif at_obj and ch == ":":
            self._expect = "value"
        elif at_obj and ch == ",":
            self._expect = "key"
        elif at_obj and not ch.isspace() and self._expect == "value":
            self._expect = None  # a number, true, false or null (not the arguments)
        return out

    def _string_char(self, ch: str, out: list[CallDelta]) -> None:
        closing = False
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            closing = True
        if self._args_on:
            self._emit(ch, out)
        elif self._key_buf is not None:
            if closing:
                self._key, self._key_buf, self._expect = json.loads(f'"{self._key_buf}"'), None, None
            else:
                self._key_buf += ch
        elif self._val_buf is not None:
            if closing:
                value, self._val_buf, self._expect = json.loads(f'"{self._val_buf}"'), None, None
                if self._key == "name" and self._name is None:
                    self._name, self._id = value, call_id()
                    out.append(CallDelta(self._index, self._id, self._name, ""))
                    if self._pending:
                        out.append(CallDelta(self._index, arguments=self._pending))
                        self._pending = ""
            else:
                self._val_buf += ch
        if closing:
            self._in_str = False

    def _emit(self, text: str, out: list[CallDelta]) -> None:
        self._args += text
        if self._name is None:
            self._pending += text  # arguments before the name: sent once the name is known
        else:
            out.append(CallDelta(self._index, arguments=text))

    def _end_call(self, out: list[CallDelta]) -> None:
        if self._name is None:  # an object without a name is no call
            return
        if not self._args:  # no arguments: OpenAI's "{}"
            self._emit("{}", out)
        self.calls.append(ToolCall(self._name, self._args, self._id or call_id()))
        self._index += 1
