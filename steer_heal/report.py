"""Figures and pages a person reads: trajectory (PNG + HTML) and the outputs page."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from steer_heal.evals.protocol import FOUNDATIONS
from steer_heal.rundir import BAKE_COLUMNS, format_table, read_jsonl, write_atomic

PANELS = [
    ("trait", "trait (persona LLR, nats/token)", "trait"),
    ("coh", "coherence (fixed prompts passing)", "coherence"),
    ("tail_nll", "tail NLL under base (nats)", "tail_nll"),
    ("trait_nats", "MFV trait_nats (signed log p)", "trait_nats"),
    ("pmass", "MFV pmass_allowed", "pmass_allowed"),
    ("nll_prefill", "MFV nll_prefill", "nll_prefill"),
]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def trajectory_figure(rows: list[dict], base: dict | None, out_png: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [p for p in PANELS if any(f"{p[0]}_healed" in x for x in rows)]
    ncol = 3
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(13, 3.6 * nrow), squeeze=False)
    r = [x["round"] for x in rows]
    bm = (base or {}).get("mfv") or {}
    for a, (key, title, bkey) in zip(axes.flat, panels):
        a.plot(r, [x.get(f"{key}_steered") for x in rows], "o-", color="tab:red", label="steered (raw vector)")
        a.plot(r, [x.get(f"{key}_healed") for x in rows], "o-", color="tab:green", label="healed (no steering)")
        bval = (base or {}).get(bkey, bm.get(bkey))
        if bval is not None:
            a.axhline(bval, color="gray", ls="--", label="base")
        a.set_title(title)
        a.set_xlabel("round")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    for a in list(axes.flat)[len(panels):]:
        a.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    out_png.write_bytes(data)
    return data


def profile_figure(series: dict[str, list[float]], out_png: Path) -> bytes:
    """Grouped bars: per-foundation probability for each named profile (base, steered, healed, human)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"human": "black", "base": "gray", "steered": "tab:red", "healed": "tab:green"}
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / max(len(series), 1)
    for j, (name, prof) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(7)]
        ax.bar(xs, prof, w, label=name, color=colors.get(name.split()[0], None), alpha=0.85)
    ax.set_xticks(range(7), FOUNDATIONS)
    ax.set_ylabel("mean p (forced choice)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    out_png.write_bytes(data)
    return data


def html_page(title: str, body: str) -> str:
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
    prof_html = ""
    last = rows[-1]
    if base and base.get("mfv") and "profile_healed" in last:
        series = {
            "human": base["mfv"]["human_profile"],
            "base": base["mfv"]["profile"],
            f"steered r{last['round']}": last["profile_steered"],
            f"healed r{last['round']}": last["profile_healed"],
        }
        pp = profile_figure(series, d / "mfv_profile.png")
        prof_html = ("<h3>Moral-foundations profile (last round)</h3><img src='data:image/png;base64,"
                     + base64.b64encode(pp).decode() + "'>")
    write_atomic(d / "trajectory.html", html_page(
        "steer-heal trajectory", f"<h2>{html.escape(d.name)}</h2><img src='data:image/png;base64,{img}'>{prof_html}"
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
    write_atomic(d / "outputs.html", html_page("steer-heal outputs", f"<h2>Outputs: {html.escape(d.name)}</h2>"
                                            "<p>Greedy answers, no steering unless the column says so.</p>"
                                            f"<table>{head}{body}</table>"))


BAKE_PANELS = [("trait_nats", "MFV trait_nats (signed log p)"), ("pmass", "MFV pmass_allowed"),
               ("nll_prefill", "MFV nll_prefill"), ("reward", "mean GRPO reward"), ("kl_rmse", "kl_rmse to reference"),
               ("kappa", "dose kappa"), ("shift_cos", "student's shift from base . v0 (cosine)"),
               ("adv_dose_corr", "advantage ~ dose inside groups (corr)"),
               ("grad_policy", "|grad| of the policy term (bake's first step)")]


def write_bake_report(run_dir: str | Path, base: dict | None = None) -> None:
    """Online run: bake-by-bake trajectory (PNG + HTML with the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    d = Path(run_dir)
    rows = read_jsonl(d / "bakes.jsonl")
    if not rows:
        return
    fig, axes = plt.subplots(3, 3, figsize=(13, 10.5))
    steps = [x["step"] for x in rows]
    bkeys = {"trait_nats": "trait_nats", "pmass": "pmass_allowed", "nll_prefill": "nll_prefill"}
    for a, (key, title) in zip(axes.flat, BAKE_PANELS):
        a.plot(steps, [x.get(key) for x in rows], "o-", color="tab:green", label="baked student")
        if base and key in bkeys and base.get(bkeys[key]) is not None:
            a.axhline(base[bkeys[key]], color="gray", ls="--", label="base")
        a.set_title(title)
        a.set_xlabel("GRPO step (bake)")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    (d / "bakes.png").write_bytes(png)
    write_atomic(d / "bakes.html", html_page("steer-heal online run", f"<h2>{html.escape(d.name)}</h2>"
                 f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                 f"<pre>{html.escape(format_table(rows, columns=BAKE_COLUMNS))}</pre>"))
