"""Does a sweep show the paper's trade-off? Reads an ablate.py sweep's results.csv and checks, for a
swept code weight: the code held-out loss falls and the text held-out loss rises from the first
point to the last by more than twice the seeds' standard deviation (pooled over the two
endpoints), and each moves monotonically in rank across the points (Spearman's rho, |rho| >= 0.9).

    python bench/tradeoff.py out/ablate_code_ratio
    python bench/tradeoff.py DIR --key sources.code.weight --falls code --rises text

Last line: one JSON object with the verdict and its numbers.
"""
import argparse
import csv
import json
import math
import os
import sys


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def check(rows: list[dict], key: str, falls: str, rises: str) -> dict:
    rows = sorted(rows, key=lambda r: float(r[key]))
    x = [float(r[key]) for r in rows]
    result = {"points": x, "key": key}
    for source, sign in ((falls, -1), (rises, 1)):
        mean = [float(r[f"eval/{source}"]) for r in rows]
        sd = [float(r[f"eval/{source} sd"]) for r in rows]
        change, pooled = mean[-1] - mean[0], math.sqrt((sd[0] ** 2 + sd[-1] ** 2) / 2)
        rho = spearman(x, mean)
        result[source] = {"mean": mean, "sd": sd, "change": change, "pooled_sd": pooled, "rho": rho,
                          "holds": sign * change > 2 * pooled and sign * rho >= 0.9}
    result["trade_off"] = result[falls]["holds"] and result[rises]["holds"]
    return result


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--key", default="sources.code.weight")
    parser.add_argument("--falls", default="code", help="the source whose held-out loss should fall")
    parser.add_argument("--rises", default="text", help="the source whose held-out loss should rise")
    args = parser.parse_args(argv)
    with open(os.path.join(args.sweep_dir, "results.csv")) as f:
        result = check(list(csv.DictReader(f)), args.key, args.falls, args.rises)
    for source in (args.falls, args.rises):
        r = result[source]
        print(f"{source}: held-out loss {r['mean'][0]:.4f} -> {r['mean'][-1]:.4f} (change {r['change']:+.4f}, "
              f"2 x pooled sd {2 * r['pooled_sd']:.4f}), Spearman rho {r['rho']:+.3f}: "
              f"{'holds' if r['holds'] else 'does not hold'}")
    print(f"trade-off {'shown' if result['trade_off'] else 'not shown'} over {args.key} = {result['points']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
