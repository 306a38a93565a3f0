"""Generate with an exported adapter (or merged model) in a fresh process: the same as `sft generate`.

python pipelines/generate.py runs/tiny --prompt "reverse: the cat sat"
"""

import sys

from sft.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
