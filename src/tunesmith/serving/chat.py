"""`tunesmith chat`: a terminal conversation with a model or run, through the same engine as the
server: the chat template, the history, tokens printed as they come, and `/reset`."""

from __future__ import annotations

import queue
from typing import Callable

from .engine import Engine, Event, Job

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) leaves"


def chat_loop(served, *, max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
              system: str | None = None, adapter: str | None = None, read: Callable[[str], str] = input,
              write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> list[dict]:
    """Converse until /exit or end of input (with `adapter`, one of `served`'s); returns the last history."""
    from ..errors import ConfigError

    tok = served.tokenizer
    if not tok.chat_template:
        raise ConfigError("chat: the model's tokenizer has no chat template; use `tunesmith serve` and "
                          "/v1/completions for plain text continuation")
    engine = Engine(served.model, tok, mixed_adapters=served.mixed, max_batch_size=1, max_queue=1,
                    load_adapter=served.ensure_loaded)
    history: list[dict] = []
    write(f"chatting with {adapter or served.base_name} ({HELP})\n")
    try:
        while True:
            try:
                line = read("> ")
            except (EOFError, KeyboardInterrupt):
                write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = []
                write("(conversation reset)\n")
                continue
            if text.startswith("/system"):
                system = text[len("/system"):].strip() or None
                history = []
                write(f"(system prompt {'set' if system else 'cleared'}; conversation reset)\n")
                continue
            if text.startswith("/"):
                write(f"(unknown command {text.split()[0]}; {HELP})\n")
                continue
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            room = served.context_length - len(ids)
            if room < 1:
                history.pop()
                write("(the conversation no longer fits the model's context; /reset to start again)\n")
                continue
            events: queue.Queue[Event] = queue.Queue()
            engine.submit([Job(ids, min(max_tokens, room), events.put, adapter=served.adapter_for(adapter),
                                  temperature=temperature, top_p=top_p)])
            reply = ""
            while True:
                ev = events.get()
                if ev.kind == "text":
                    reply += ev.text
                    write(ev.text)
                elif ev.kind == "error":
                    write(f"\n(error: {ev.text})")
                    break
                else:
                    if ev.finish_reason == "length":
                        write(" [cut at max tokens]")
                    break
            write("\n")
            history.append({"role": "assistant", "content": reply})
    finally:
        engine.close()
    return history
