"""loram generate MODEL [--adapter A] --prompt "..." """

from __future__ import annotations

from ..settings import add_precision
from .common import COUNT, Number, add_device, add_verify_base


def add(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model (original, pruned or merged), optionally with an adapter")
    p.add_argument("model")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--temperature", type=Number(float, min=0.0, zero="0: greedy"), default=0.0, help="0 = greedy")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    add_verify_base(p, record=False)
    add_device(p)
    add_precision(p)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..device import compute_dtype, resolve_device
    from ..merge import generate

    device = resolve_device(a.device)  # before any model is read: a missing GPU is one line
    print(generate(a.model, a.prompt, adapter=a.adapter, max_new_tokens=a.max_new_tokens, chat=not a.no_chat,
                   temperature=a.temperature, verify_base=a.verify_base, device=device,
                   dtype=compute_dtype(a.precision, device)))
    return 0
