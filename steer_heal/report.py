"""Figures and pages a person reads: trajectory (PNG + HTML) and the outputs page."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from steer_heal.rundir import format_table, read_jsonl, write_atomic


def trajectory_figure(rows: list[dict], base: dict | None, out_png: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    r = [x["round"] for x in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("trait", "trait (persona LLR, nats/token)"), ("coh", "coherence (fraction passing)"),
              ("tail_nll", "tail NLL under base (nats)")]
    for a, (key, title) in zip(ax, panels):
        ks, kh = (f"{key}_steered", f"{key}_healed")
        a.plot(r, [x.get(ks) for x in rows], "o-", color="tab:red", label="steered (raw vector)")
        a.plot(r, [x.get(kh) for x in rows], "o-", color="tab:green", label="healed (no steering)")
        bkey = {"coh": "coherence"}.get(key, key)
        if base and base.get(bkey) is not None:
            a.axhline(base[bkey], color="gray", ls="--", label="base")
        a.set_title(title)
        a.set_xlabel("round")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    out_png.write_bytes(data)
    return data


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}th{background:#f4f4f4}"
            "pre{white-space:pre-wrap}</style></head><body>" + body + "</body></html>")


def write_report(run_dir: str | Path) -> None:
    d = Path(run_dir)
    rows = read_jsonl(d / "rounds.jsonl")
    if not rows:
        return
    base = json.loads((d / "base_eval.json").read_text()) if (d / "base_eval.json").exists() else None
    png = trajectory_figure(rows, base, d / "trajectory.png")
    img = base64.b64encode(png).decode()
    write_atomic(d / "trajectory.html", _page(
        "steer-heal trajectory", f"<h2>{html.escape(d.name)}</h2><img src='data:image/png;base64,{img}'>"
        f"<pre>{html.escape(format_table(rows, base=base))}</pre><p><a href='outputs.html'>outputs page</a></p>"))
    # outputs page: same fixed prompts answered by base, steered and each healed round
    cols, answers = [], []
    if base:
        cols.append("base")
        answers.append(base["texts"])
        prompts = base["prompts"]
    for x in rows:
        ev = json.loads((d / f"round_{x['round']:02d}" / "eval.json").read_text())
        prompts = ev["healed"]["prompts"]
        cols += [f"r{x['round']} steered (c={x['kappa']:.3g})", f"r{x['round']} healed"]
        answers += [ev["steered"]["texts"], ev["healed"]["texts"]]
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    body = "".join("<tr><td><b>" + html.escape(p) + "</b></td>" + "".join(
        f"<td>{html.escape(a[i])}</td>" for a in answers) + "</tr>" for i, p in enumerate(prompts))
    write_atomic(d / "outputs.html", _page("steer-heal outputs", f"<h2>Outputs: {html.escape(d.name)}</h2>"
                                            "<p>Greedy answers, no steering unless the column says so.</p>"
                                            f"<table>{head}{body}</table>"))
