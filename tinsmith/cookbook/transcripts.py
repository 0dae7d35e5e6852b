"""HTML transcripts of sampled conversations and RL episodes, for reading in a browser.

`write_html_transcripts(path, episodes)` writes one self-contained HTML file: inline CSS,
no scripts, no CDN, so it opens offline and can be attached to a report. Each episode is
a card with its messages (roles coloured), its reward and its metrics. All text from the
episodes is escaped with `html.escape`, so model output such as `<script>` shows as text.

An episode is an `Episode`, or any mapping with "messages" and optionally "reward",
"metrics" and "title" (e.g. a line of a recipe's JSONL log).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["Episode", "render_html", "write_html_transcripts"]


@dataclass
class Episode:
    """One transcript: the conversation, and the reward and metrics it earned (if any)."""

    messages: Sequence[Mapping[str, Any]]  # {"role": str, "content": str}
    reward: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    title: str | None = None


# Roles with their own colour; any other role gets the "other" style. Role names are
# only used as CSS classes through this table, never copied into the markup as classes.
_ROLE_CLASSES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "environment": "tool"}

_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; color: #1f2328; background: #f6f8fa; }
h1 { font-size: 1.4rem; } .summary { color: #57606a; margin-bottom: 1.5rem; }
.episode { background: #fff; border: 1px solid #d0d7de; border-radius: 8px;
           padding: 1rem; margin-bottom: 1.5rem; }
.episode h2 { font-size: 1.05rem; margin: 0 0 .5rem; display: flex; gap: 1rem; }
.reward { font-family: ui-monospace, monospace; padding: 0 .5rem; border-radius: 4px;
          background: #eaeef2; }
.reward.pos { background: #dafbe1; } .reward.neg { background: #ffebe9; }
.metrics { font-family: ui-monospace, monospace; font-size: .85rem; color: #57606a;
           margin: 0 0 .75rem; }
.msg { border-left: 4px solid #8c959f; padding: .4rem .75rem; margin: .5rem 0;
       border-radius: 4px; background: #f6f8fa; }
.msg .role { font-weight: 600; font-size: .8rem; text-transform: uppercase; }
.msg pre { white-space: pre-wrap; word-wrap: break-word; margin: .25rem 0 0;
           font-family: ui-monospace, monospace; font-size: .9rem; }
.msg.system { border-color: #8250df; background: #fbefff; } .system .role { color: #8250df; }
.msg.user { border-color: #0969da; background: #ddf4ff; } .user .role { color: #0969da; }
.msg.assistant { border-color: #1a7f37; background: #dafbe1; }
.assistant .role { color: #1a7f37; }
.msg.tool { border-color: #9a6700; background: #fff8c5; } .tool .role { color: #9a6700; }
"""


def _as_episode(item: Episode | Mapping[str, Any]) -> Episode:
    if isinstance(item, Episode):
        return item
    if not isinstance(item, Mapping) or "messages" not in item:
        raise TypeError("an episode is an Episode or a mapping with 'messages'")
    return Episode(messages=item["messages"], reward=item.get("reward"),
                   metrics=item.get("metrics") or {}, title=item.get("title"))


def _fmt(value: Any) -> str:
    """Numbers compactly (4 significant digits), anything else as str."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _episode_html(index: int, ep: Episode) -> str:
    e = html.escape
    head = [f"<span>#{index}</span>"]
    if ep.title:
        head.append(f"<span>{e(ep.title)}</span>")
    if ep.reward is not None:
        sign = "pos" if ep.reward > 0 else "neg" if ep.reward < 0 else "zero"
        head.append(f'<span class="reward {sign}">reward: {e(_fmt(float(ep.reward)))}</span>')
    parts = [f'<section class="episode" id="episode-{index}">', f"<h2>{''.join(head)}</h2>"]
    if ep.metrics:
        items = ", ".join(f"{e(str(k))}={e(_fmt(v))}" for k, v in ep.metrics.items())
        parts.append(f'<p class="metrics">{items}</p>')
    for m in ep.messages:
        role = str(m.get("role", "?"))
        content = m.get("content", "")
        if not isinstance(content, str):  # e.g. structured content parts: show them as data
            content = repr(content)
        css = _ROLE_CLASSES.get(role, "other")
        parts.append(f'<div class="msg {css}"><div class="role">{e(role)}</div>'
                     f"<pre>{e(content)}</pre></div>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(episodes: Iterable[Episode | Mapping[str, Any]],
                title: str = "Transcripts") -> str:
    """The transcript page as a string (see `write_html_transcripts`)."""
    eps = [_as_episode(x) for x in episodes]
    rewards = [float(ep.reward) for ep in eps if ep.reward is not None]
    rewards = [r for r in rewards if not math.isnan(r)]
    summary = f"{len(eps)} episode{'s' if len(eps) != 1 else ''}"
    if rewards:
        summary += f", mean reward {_fmt(sum(rewards) / len(rewards))}"
    body = "\n".join(_episode_html(i, ep) for i, ep in enumerate(eps))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"summary\">{html.escape(summary)}</p>\n"
        f"{body}\n</body>\n</html>\n"
    )


def write_html_transcripts(path: str | PathLike[str],
                           episodes: Iterable[Episode | Mapping[str, Any]],
                           title: str = "Transcripts") -> Path:
    """Write the episodes to one self-contained HTML file at `path` (parents created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_html(episodes, title), encoding="utf-8")
    tmp.replace(out)  # atomic: a reader never sees a half-written page
    return out
