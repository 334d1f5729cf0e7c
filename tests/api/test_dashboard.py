"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) and the Prometheus
metrics, on jobs submitted both through the API and through the CLI."""
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from batchgen.cli import main
from batchgen.workers.app import job_store
from test_requests import chat_line, upload

pytestmark = pytest.mark.slow   # a real worker process on the default model, and a browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "api-dashboard"
BLUE = (59, 130, 246)         # the throughput line's colour in dashboard.js


def get_json(url: str):
    with urllib.request.urlopen(url) as response:
        return json.load(response)


@pytest.fixture
def jobs(server, worker, tmp_path) -> tuple[str, str]:
    """(an API batch's job id, a CLI job's id), both queued."""
    client = server.client()
    lines = [chat_line(f"d{i}", f"Tell me about the number {i}.", temperature=0, max_tokens=12, ignore_eos=True)
             for i in range(6)]
    batch_id = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                     completion_window="24h").id
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}"}) + "\n" for i in range(4)))
    submitted = CliRunner().invoke(main, ["submit", str(prompts), "-o", str(tmp_path / "cli-out"), "--model",
                                          "default", "--max-tokens", "8", "--shard-size", "2"])
    assert submitted.exit_code == 0, submitted.output
    return batch_id, submitted.stdout.strip()


def painted(page, canvas_id: str, colour: tuple[int, int, int] | None = None) -> int:
    """Pixels of a canvas that were drawn on (of `colour`, give or take anti-aliasing, when given)."""
    return page.evaluate("""([id, colour]) => {
        const canvas = document.getElementById(id);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i + 3] === 0) continue;
            if (!colour || Math.abs(data[i] - colour[0]) + Math.abs(data[i + 1] - colour[1])
                + Math.abs(data[i + 2] - colour[2]) < 60) count++;
        }
        return count;
    }""", [canvas_id, list(colour) if colour else None])


def test_dashboard_follows_jobs_to_the_end(server, jobs, tmp_path):
    from playwright.sync_api import sync_playwright

    batch_id, cli_job = jobs
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 800})
        page.goto(f"{server.url}/")
        for job_id in jobs:
            page.wait_for_selector(f'tr[data-job-id="{job_id}"]', timeout=30_000)
        page.screenshot(path=tmp_path / "jobs-running.png")
        page.wait_for_function("""ids => ids.every(id => document.querySelector(
            `tr[data-job-id="${id}"] .progress .label`).textContent.startsWith("100%"))""", arg=list(jobs),
                               timeout=120_000)
        row = page.locator(f'tr[data-job-id="{batch_id}"]')
        assert row.locator("td").nth(1).inner_text() == "completed"
        assert row.locator(".progress .label").inner_text() == "100% · 6/6 rows"
        page.screenshot(path=tmp_path / "jobs.png")

        row.locator("a").click()
        page.wait_for_url(f"**/jobs/{batch_id}")
        page.wait_for_function("Number(document.getElementById('throughput').dataset.points) > 0")
        page.wait_for_function("document.querySelectorAll('#shards tbody tr').length === 3")
        assert painted(page, "throughput", BLUE) > 200 and painted(page, "timeline") > 500
        assert page.locator("#stats").inner_text().count("6 of 6 (0 failed)") == 1
        page.screenshot(path=tmp_path / "job.png", full_page=True)
        browser.close()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for shot in tmp_path.glob("*.png"):
        shutil.copy(shot, SCREENSHOTS / shot.name)

    # the chart's buckets hold every generated token: tokens/s times the bucket width, summed
    job = get_json(f"{server.url}/dashboard/jobs/{batch_id}")
    width = 2 * job["throughput"][0]["t"]
    assert sum(p["tokens_per_s"] * width for p in job["throughput"]) == pytest.approx(job["completion_tokens"])
    assert job["completion_tokens"] == 6 * 12 and job["rows_per_s"] > 0 and job["eta_s"] is None


def test_metrics_agree_with_the_job_store(server, worker, jobs):   # jobs: our worker has run shards
    store = job_store()
    deadline = time.monotonic() + 60
    # jobs of earlier tests end first, and our worker has said it is idle (a job ends when its last shard's
    # rows are recorded, a moment before the worker's heartbeat drops the shard)
    while (any(not job.finished for job in store.list_jobs())
           or any(w.pid == worker.pid and w.job_id is not None for w in store.live_workers())):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with urllib.request.urlopen(f"{server.url}/metrics") as response:
        families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    jobs = store.list_jobs()
    for status in ("queued", "running", "completed", "failed", "cancelled"):
        assert samples[("batchgen_jobs", (("status", status),))] == sum(j.status == status for j in jobs)
    assert samples[("batchgen_rows_total", (("outcome", "failed"),))] == sum(j.rows_failed for j in jobs)
    assert samples[("batchgen_rows_total", (("outcome", "ok"),))] == sum(j.rows_done - j.rows_failed for j in jobs)
    assert samples[("batchgen_generated_tokens_total", ())] == sum(j.completion_tokens for j in jobs) > 0
    assert samples[("batchgen_queue_depth", (("model", "default"),))] == 0
    workers = store.live_workers()
    assert samples[("batchgen_workers", (("model", "default"),))] == len(workers) >= 1
    ours = next(w for w in workers if w.pid == worker.pid)
    labels = (("model", "default"), ("worker", ours.worker_id))
    assert samples[("batchgen_worker_busy", labels)] == 0
    assert samples[("batchgen_worker_output_tokens_per_second", labels)] > 0    # it finished shards this minute
