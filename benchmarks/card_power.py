"""Run a command while nvidia-smi samples the card every 100 ms, then print one line `card_power {...}`: over the
samples under load (drawing more than half the power limit), the mean power against the limit, the mean and lowest
SM clock against the card's maximum, and the share of them in which the software power cap held the clock down.
It tells whether a run is bound by the card's power limit: there less energy a step helps (fewer FLOPs or bytes),
not a kernel that is faster at the boost clock.

    python3 benchmarks/card_power.py batchgen bench --model benchmarks/configs/llama-3.1-8b --load-format dummy ...
"""
import json
import statistics
import subprocess
import sys

FIELDS = "power.draw,power.limit,clocks.sm,clocks.max.sm,clocks_event_reasons.sw_power_cap"


def summarize(rows: list[list[str]]) -> dict:
    loaded = [row for row in rows if float(row[0]) > float(row[1]) / 2]
    if not loaded:
        return {"samples": len(rows), "loaded_samples": 0}
    power, clock = [float(row[0]) for row in loaded], [float(row[2]) for row in loaded]
    return {"samples": len(rows), "loaded_samples": len(loaded),
            "power_w_mean": round(statistics.fmean(power), 1), "power_limit_w": float(loaded[0][1]),
            "sm_mhz_mean": round(statistics.fmean(clock)), "sm_mhz_min": min(clock), "sm_mhz_max": float(loaded[0][3]),
            "power_capped_share": round(sum(row[4] == "Active" for row in loaded) / len(loaded), 3)}


def _numbers(fields: list[str]) -> bool:
    try:
        return all(float(field) >= 0 for field in fields)
    except ValueError:   # "[N/A]" in a sample nvidia-smi could not read
        return False


def main() -> int:
    sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "100"],
                               stdout=subprocess.PIPE, text=True)
    try:
        code = subprocess.call(sys.argv[1:])
    finally:
        sampler.terminate()
    rows = [[field.strip() for field in line.split(",")] for line in sampler.communicate()[0].splitlines()]
    print("card_power", json.dumps(summarize([row for row in rows if len(row) == 5 and _numbers(row[:4])])), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
