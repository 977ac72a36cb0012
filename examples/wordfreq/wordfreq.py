"""Count word frequencies in a folder of text files: an example msp job.

msp runs this script with MSP_DATA_DIR naming the folder to read and
MSP_OUTPUT_DIR the folder to write. By hand, give the two folders as
arguments instead:

    python examples/wordfreq/wordfreq.py examples/wordfreq/data /tmp/out

It reads every *.txt file under the data folder and writes two files:

    frequencies.csv  word,count for every word, most frequent first
    summary.json     files read, total and distinct words, the top words

Standard library only, so any worker's Python can run it.
"""

import argparse
import csv
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

# A word is a run of letters and apostrophes ("summer's", "o'er"). [^\W\d_]
# is "a letter": \w minus digits and underscore, in any alphabet.
WORD = re.compile(r"(?:[^\W\d_]|')+")
# Texts use the typographic apostrophe as often as the ASCII one; count
# "nature's" and "nature’s" as one word.
CURLY = str.maketrans({"\u2019": "'", "\u2018": "'"})


def progress(value, message):
    # The msp worker reads progress from stdout lines of this exact form.
    # Flush so the line reaches the log now, not when the buffer fills.
    print(f"msp:progress {value:.2f} {message}", flush=True)


def words(text):
    """The words of ``text``, lower-cased."""
    for word in WORD.findall(text.lower().translate(CURLY)):
        # Quotation marks look like apostrophes: "'tis" keeps its
        # apostrophe, but the quote in "my mistress' eyes" would make
        # "mistress'" a word of its own, so strip them from the ends.
        word = word.strip("'")
        if word:
            yield word


def folder(env, given, what):
    """The folder msp names in ``env``, else the one given by hand."""
    path = os.environ.get(env) or given
    if not path:
        sys.exit(f"wordfreq: no {what} folder: set {env} or pass it")
    return Path(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", help="folder of .txt files")
    parser.add_argument("output", nargs="?", help="folder for the results")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="words to list in summary.json (default 10)")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be 0 or more")

    data = folder("MSP_DATA_DIR", args.data, "data")
    output = folder("MSP_OUTPUT_DIR", args.output, "output")
    # Sorted, so that two runs on the same data report in the same order.
    files = sorted(p for p in data.rglob("*.txt") if p.is_file())
    if not files:
        # Empty results would look like a success; an empty data folder
        # is more likely a wrong path, so fail and say so.
        sys.exit(f"wordfreq: no .txt files under {data}")

    counts = Counter()
    per_file = {}
    for i, path in enumerate(files):
        name = str(path.relative_to(data))
        progress(i / len(files), f"reading {name}")
        # A stray byte in one file should not sink the whole job.
        text = path.read_text(encoding="utf-8", errors="replace")
        found = Counter(words(text))
        per_file[name] = sum(found.values())
        counts.update(found)

    progress(1.0, "writing results")
    # By hand the output folder may not exist yet; under msp it does.
    output.mkdir(parents=True, exist_ok=True)
    # Most frequent first; ties in alphabetical order, so the file is
    # stable from run to run.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    with open(output / "frequencies.csv", "w", newline="",
              encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["word", "count"])
        writer.writerows(ranked)
    summary = {
        "files": per_file,
        "total_words": sum(counts.values()),
        "distinct_words": len(counts),
        "top": [{"word": w, "count": c} for w, c in ranked[:args.top]],
    }
    with open(output / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # No folder in this line: under msp it would name the attempt's scratch
    # folder, which msp empties into the output folder once the job ends.
    print(f"wrote frequencies.csv ({len(counts)} distinct words) and "
          f"summary.json ({summary['total_words']} words in {len(files)} "
          f"files)")


if __name__ == "__main__":
    main()
