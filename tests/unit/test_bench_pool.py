"""tests/bench.py --pool: the ratios over several runs' samples (no root, no sessions)."""
import json
import os
import random
import statistics
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402


def write_run(tmp_path, name, off, on, pairs):
    path = tmp_path / name
    on_over_off = sorted(on)[len(on) // 2] / sorted(off)[len(off) // 2]
    path.write_text(json.dumps({
        "args": {"pairs": pairs},
        "flood": {"ratio": on_over_off, "samples": {"off": off, "on": on}},
        "scp": {"ratio": 1.0, "samples": {"off": [200.0] * pairs, "on": [190.0] * pairs}}}))
    return str(path)


def test_pool_takes_the_median_of_all_runs_samples_and_resamples_within_each(tmp_path):
    a = write_run(tmp_path, "a.json", [1.0] * 5, [1.25] * 5, 5)
    b = write_run(tmp_path, "b.json", [1.0] * 5, [1.0, 1.0, 1.0, 1.0625, 1.0], 5)
    lines = bench.pool([a, b])
    assert lines[0] == "pooled: 2 run(s), 5+5 pairs"
    flood = next(line for line in lines if line.startswith("flood"))
    # ten on samples, five of each run: the median is the mean of b's largest and 1.25
    assert "ratio 1.156 " in flood and "OVER BUDGET" in flood
    assert "(each run: 1.250 1.000)" in flood
    low, high = (float(x) for x in flood.split("[")[1].split("]")[0].split("-"))
    # each run resampled on its own: five of a's and five of b's in every round
    assert 1.125 <= low < high <= 1.157
    scp = next(line for line in lines if line.startswith("scp"))
    assert "ratio 1.053 " in scp            # throughput: off over on
    assert not any(line.startswith(("exec", "parallel")) for line in lines)  # not in the runs


def test_runs_at_different_speeds_are_pooled_as_ratios_not_as_raw_times():
    slow_host = ([10.0] * 5, [10.2] * 5)      # 1.02
    fast_host = ([1.0] * 5, [1.1] * 5)        # 1.10
    # raw times pooled would give 5.65 / 5.5 = 1.027, the slow host's level deciding
    assert abs(bench.pooled_ratio([slow_host, fast_host], False) - 1.06) < 1e-9
    assert abs(bench.pooled_ratio([slow_host], False) - 1.02) < 1e-9
    throughput = ([200.0] * 4, [190.0] * 4)
    assert abs(bench.pooled_ratio([throughput], True) - 200.0 / 190.0) < 1e-9


def test_one_runs_interval_is_its_plain_bootstrap_of_the_ratio_of_medians():
    """With one run, scaling by its off median cancels out: the interval is the same
    bootstrap of median(on) / median(off) the bench printed before --pool existed."""
    noise = random.Random(1)
    off = [1.0 + noise.random() / 5 for _ in range(31)]
    on = [1.04 + noise.random() / 5 for _ in range(31)]
    rng, plain = random.Random(5), []
    for _ in range(2000):
        picks = [rng.randrange(len(off)) for _ in range(len(off))]
        plain.append(statistics.median([on[i] for i in picks]) /
                     statistics.median([off[i] for i in picks]))
    plain.sort()
    low, high = bench.ratio_interval([(off, on)], False)
    assert abs(low - plain[100]) < 1e-9 and abs(high - plain[1899]) < 1e-9
    assert low < bench.pooled_ratio([(off, on)], False) < high
    assert bench.ratio_interval([([1.0] * 3, [1.1] * 3)], False) is None     # under 4 pairs


def test_an_unreadable_run_is_a_one_line_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(SystemExit) as e:
        bench.pool([missing])
    assert str(e.value).startswith("bench: %s: " % missing)
