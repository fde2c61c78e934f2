"""``python -m data.shards``: convert an ImageFolder root to shards (errors as one line, exit 2)."""
from utils import run_entry_point

from .convert import main

run_entry_point(main)
