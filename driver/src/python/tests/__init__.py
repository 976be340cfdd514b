"""Unit tests of the test_driver package, run without a VM.

The package is imported from the source tree with `fake_skiff` standing in
for skiff's Rust module `_skiff`, so these tests check the Python side
alone: the API's arguments, return values, log blocks and error texts.
Run them from driver/src/python with

    python3 -m unittest discover -s tests -t .

(`cargo test -p skiff-driver` does, with the interpreter skiff embeds).
Importing this package installs the fake before any test imports
test_driver.
"""

import sys

from tests import fake_skiff

sys.modules["_skiff"] = fake_skiff
