"""report.html: one self-contained page per run, parsed, and opened in a real headless browser."""

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_lit.evaluation.calibration import fit_temperature
from alexnet_lit.evaluation.run_page import report_main, result_summary
from alexnet_lit.inference.predict import load_model, predict_probs
from tests.conftest import HOSTILE, EvaluatedRun
from tests.helpers import TINY_WIDTH

SECTIONS = ["run", "result", "curves", "evaluation", "data", "reproduce"]


class Page(HTMLParser):
    """Collects a page's section ids, image sources, link targets and tags."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


@pytest.fixture(scope="module")
def run(evaluated_run: EvaluatedRun) -> EvaluatedRun:
    """The shared fit (tests/conftest.py): its data has a class named like markup, a val image
    copied from train and a truncated training JPEG; validate and test ran on its last.ckpt."""
    return evaluated_run


def parse(path: Path) -> tuple[str, Page]:
    html = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(html)
    return html, page


@pytest.mark.slow
def test_the_report_has_every_section_and_only_inlined_pictures(run):
    html, page = parse(run.fit / "report.html")
    assert page.sections == SECTIONS
    assert len(page.images) >= 6  # curves, confusion matrices, reliability, mistakes
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as picture:
            picture.load()
            assert picture.width > 50 and picture.height > 50
    assert not page.links  # no stylesheet, script or anything else to fetch
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe")]
    assert "http://" not in html and "https://" not in html
    # The hostile class name is shown, escaped, and is never a tag of the page.
    assert "&lt;script&gt;alert(1)&lt;img src=x onerror=alert(1)&gt;" in html
    assert HOSTILE not in html and "<script" not in html
    assert not [attrs for tag, attrs in page.tags if "onerror" in attrs]
    # What a reader needs: the result, the checkpoint, the command that re-runs it.
    assert "best <code>val/acc</code>" in html and "best-epoch=" in html
    assert f"python scripts/train.py fit --config {run.fit / 'config.yaml'}" in html
    assert f"AlexNet (tutorial, {TINY_WIDTH} wide), random weights" in html
    # Refreshed by the later validate and test of its checkpoint.
    assert "validate in version_1" in html and "test in version_2" in html
    # The data section: what the scan left out and why, and what train and val share.
    assert "1 image(s) left out as unreadable" in html
    assert f"<code>{run.truncated}</code>" in html
    leak = f"<code>{run.leak[0]}</code> = <code>"
    assert "1 group(s) of byte-identical images span more than one split" in html and leak in html


@pytest.mark.slow
def test_a_fit_ends_with_a_summary_of_where_its_results_went(run):
    out = run.fit_output
    epoch = int(Path(run.best_model_path).name.split("best-epoch=")[1][:2])
    assert f"best val/acc {run.best_model_score:.4f} (epoch {epoch})" in out
    assert "best checkpoint: lightning_logs/version_0/checkpoints/best-epoch=" in out
    assert "report: lightning_logs/version_0/report.html" in out
    assert "tensorboard --logdir lightning_logs" in out
    (line,) = [m for m in run.log if m.startswith("temperature scaling: T = ")]
    assert line.count("(") == line.count(")") and " in the best checkpoint; " in line


def test_the_report_is_rebuilt_from_the_run_folder_alone(run, capsys):
    report = run.fit / "report.html"
    before = report.read_text(encoding="utf-8")
    report.unlink()
    assert report_main([str(run.fit)]) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    after = report.read_text(encoding="utf-8")

    # The same page, but for the time it was written at.
    def undated(html: str) -> str:
        return re.sub(r"report written [^<]*", "", html)

    assert undated(after) == undated(before)


def test_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: '{tmp_path}' is not a run folder")


def test_a_damaged_file_in_the_run_folder_is_one_line(run, tmp_path, capsys):
    folder = tmp_path / "version_0"
    shutil.copytree(run.fit, folder, ignore=shutil.ignore_patterns("checkpoints"))
    summary = folder / "val_report.json"
    summary.write_text(summary.read_text()[:20])  # cut off mid-write
    assert report_main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{summary}' cannot be read (JSONDecodeError")
    assert err.count("\n") == 1
    (folder / "config.yaml").write_text("- a list, not a config\n")  # edited by hand, say
    assert report_main([str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"error: '{folder / 'config.yaml'}' holds no config")


def test_a_run_validated_every_other_epoch_counts_its_epochs_not_its_validations(tmp_path):
    # 4 epochs of 2 steps, validated after epochs 1 and 3: Lightning logs "epoch" at each step
    # it logs anything.
    scalars = {
        "epoch": [(1, 0.0), (3, 1.0), (5, 2.0), (7, 3.0)],
        "train/loss_epoch": [(1, 0.9), (3, 0.7), (5, 0.6), (7, 0.5)],
        "val/acc": [(3, 0.9), (7, 0.8)],
    }
    summary = result_summary(tmp_path, scalars)
    assert summary["best_val_acc"] == 0.9
    assert (summary["best_epoch"], summary["epochs"]) == (1, 4)
    # Without Lightning's epoch scalar (another logger's folder): one point per epoch.
    summary = result_summary(tmp_path, {"val/acc": [(3, 0.9), (7, 0.8)]})
    assert (summary["best_epoch"], summary["epochs"]) == (0, 2)


# Chromium's own background requests (time, sign-in, safe browsing), which never come from a page.
BROWSER_HOSTS = ("google.com", "gstatic.com", "googleapis.com", "googleusercontent.com")


class RequestRecorder:
    """A TCP listener on loopback that records the first line of every request made to it:
    the browser's proxy, so that each request the page makes is seen (and none is forwarded)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            connection.settimeout(1)
            try:
                first = connection.recv(512).split(b"\r\n")[0].decode("latin-1")
                if first:  # Chromium may open a spare connection and close it unused
                    self.requests.append(first)
            except OSError:
                self.requests.append("?")
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.server.close()

    def from_the_page(self) -> list[str]:
        """The requests that are not Chromium's own background ones."""

        def host(line: str) -> str:
            target = line.split(" ")[1] if " " in line else line
            return target.split("://")[-1].split("/")[0].split(":")[0]

        return [line for line in self.requests if not host(line).endswith(BROWSER_HOSTS)]


def render(browser: str, page: Path, screenshot: Path) -> list[str]:
    """Open ``page`` in headless Chromium, screenshot it; returns the page's own requests."""
    proxy = RequestRecorder()
    try:
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--disable-extensions",
             f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
             "--window-size=1200,1600", f"--screenshot={screenshot}", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr[-2000:]
    return proxy.from_the_page()


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser_without_a_network_request(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "no Chromium here (.ci/run installs Debian's chromium); apt-get install chromium"
        )
    # The check itself: a page that does fetch something is caught.
    fetching = tmp_path / "fetching.html"
    fetching.write_text('<img src="http://example.invalid/pixel.png">')
    assert render(browser, fetching, tmp_path / "fetching.png") == [
        "GET http://example.invalid/pixel.png HTTP/1.1"
    ]
    screenshot = tmp_path / "report.png"
    assert render(browser, run.fit / "report.html", screenshot) == []  # asked for nothing
    with Image.open(screenshot) as picture:
        pixels = np.asarray(picture.convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # text, tables and pictures, not a blank page
    assert (pixels < 100).mean() > 0.01  # some dark ink: the page rendered its content


@pytest.mark.slow
def test_each_checkpoint_carries_the_temperature_fitted_on_its_own_weights(run):
    checkpoints = run.fit / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    val = run.data / "val"
    samples = [
        (path, index)
        for index, name in enumerate(sorted(p.name for p in val.iterdir()))
        for path in sorted((val / name).iterdir())
    ]
    targets = torch.tensor([target for _, target in samples])
    stored = []
    for ckpt in (best, checkpoints / "last.ckpt"):
        model = load_model(ckpt)
        # log-softmax: the logits up to a constant per row, which a temperature ignores.
        logits = predict_probs(model, samples).log()

        def nll(temperature: float, logits: torch.Tensor = logits) -> float:
            return float(torch.nn.functional.cross_entropy(logits / temperature, targets))

        # The stored temperature is the best one for these weights' logits (on a tiny run the
        # optimum can be flat, so compare the loss it reaches, not the value; after the first
        # epoch's two steps the logits can be so near uniform that T stays exactly 1).
        assert nll(model.hparams.temperature) <= nll(fit_temperature(logits, targets)) + 1e-4
        assert nll(model.hparams.temperature) <= nll(1.0)
        stored.append(model.hparams.temperature)
    # Each file holds its own epoch's (the last epoch is never the best: RUN_LR), one fitted.
    assert stored[0] != stored[1] and any(t != 1.0 for t in stored)


@pytest.mark.slow
def test_a_validate_or_test_report_shows_the_checkpoint_and_its_accuracy(run):
    for folder, stage in ((run.validate, "val"), (run.test, "test")):
        html, _ = parse(folder / "report.html")
        result = json.loads((folder / f"{stage}_report.json").read_text())
        name = "validation" if stage == "val" else "test"
        said = f"{result['accuracy']:.4f}</span> accuracy of the checkpoint on {result['images']}"
        assert f"{said} {name} images" in html
        assert f"<th>checkpoint</th><td>{run.fit / 'checkpoints' / 'last.ckpt'}</td>" in html
        # Not the settings of a training it did not do, nor a best epoch "of 1".
        assert "random weights" not in html and "<th>optimizer</th>" not in html
        assert "best <code>val/acc</code>" not in html
