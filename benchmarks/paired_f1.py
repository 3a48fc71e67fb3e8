"""Paired F1 differences of unpad_acceptance.sh's runs: --unpad minus --no-unpad for each seed.

With dropout on, the two modes draw different masks, so one pair differs about as much as two seeds
do (6 to 14 F1 points on the acceptance run). What says whether unpadding costs accuracy is the mean
of the paired differences over several seeds and its 95% interval (Student's t).
    python benchmarks/paired_f1.py runs/unpad-acceptance/results.txt
"""

import re
import statistics
import sys

# Two-sided 95% quantiles of Student's t for 1..12 degrees of freedom; 1.96 beyond.
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18]
LINE = re.compile(r"^seed (\S+) --(unpad|no-unpad) .*final: exact_match=\S+ f1=(\S+)")


def main(path: str) -> None:
    f1 = {}
    with open(path, encoding="utf-8") as results:
        for line in results:
            match = LINE.match(line)
            if match:
                seed, mode, score = match.groups()
                f1.setdefault(seed, {})[mode] = float(score)
    pairs = {seed: runs for seed, runs in f1.items() if len(runs) == 2}
    if not pairs:
        print(f"{path}: no seed has both an --unpad and a --no-unpad final line")
        return
    print("seed  --unpad  --no-unpad  difference")
    diffs = []
    for seed, runs in pairs.items():
        diffs.append(runs["unpad"] - runs["no-unpad"])
        print(f"{seed:>4}  {runs['unpad']:7.2f}  {runs['no-unpad']:10.2f}  {diffs[-1]:+10.2f}")
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        print(f"one seed: difference {mean:+.2f} F1; run more seeds for an interval")
        return
    t95 = T95[len(diffs) - 2] if len(diffs) - 2 < len(T95) else 1.96
    half = t95 * statistics.stdev(diffs) / len(diffs) ** 0.5
    low, high = mean - half, mean + half
    print(f"mean difference {mean:+.2f} F1 over {len(diffs)} seeds, 95% interval [{low:+.2f}, {high:+.2f}]")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/paired_f1.py RESULTS_FILE (the results.txt that unpad_acceptance.sh writes)")
    try:
        main(sys.argv[1])
    except OSError as error:
        sys.exit(f"{sys.argv[1]}: cannot read it ({error.strerror}); pass an unpad_acceptance.sh results.txt")
