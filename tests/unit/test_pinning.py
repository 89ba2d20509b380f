"""Roles pinned to CPU sets: every thread of the process moves, bad sets are ConfigErrors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adrenaline import ConfigError
from adrenaline.actors.pinning import pin_process, thread_budget
from adrenaline.app_config import parse_app_args


def test_pin_moves_every_thread_of_the_process():
    code = """
import os, threading, time
from adrenaline.actors.pinning import pin_process
ev = threading.Event()
t = threading.Thread(target=ev.wait)   # a thread that exists before pinning
t.start()
pin_process([0], "decode.cpus")
after = threading.Thread(target=ev.wait)  # and one started after
after.start()
masks = {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}
ev.set()
print(sorted({tuple(sorted(m)) for m in masks.values()}), len(masks))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "[(0,)]" and int(out[1]) >= 3


def test_a_core_that_does_not_exist_is_a_config_error_naming_the_field():
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=r"prefill\.cpus: .*\[" + str(missing)):
        pin_process([missing], "prefill.cpus")


@pytest.mark.parametrize("cpus", [[], [-1], [0, 0]])
def test_bad_cpu_sets_are_rejected_at_parse(cpus):
    with pytest.raises(ConfigError, match=r"cpus.*decode"):
        parse_app_args({"decode": {"cpus": cpus}})


def test_thread_budget():
    assert thread_budget(None, None) == 1
    assert thread_budget(None, [0, 1]) == 2
    assert thread_budget(3, [0]) == 3


def test_local_yaml_pins_prefill_and_decode_apart():
    import yaml
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).parents[2] / "serve_configs" / "local.yaml").read_text())
    args = parse_app_args(doc["applications"][0]["args"])
    assert args.prefill.cpus == [0] and args.decode.cpus == [1] and args.transport == "auto"


def test_nice_applies_to_every_thread_and_is_validated():
    code = """
import os, threading
from adrenaline.actors.pinning import pin_process
ev = threading.Event()
t = threading.Thread(target=ev.wait)   # a thread that exists before
t.start()
pin_process(None, "decode.cpus", nice=7)
after = threading.Thread(target=ev.wait)  # and one started after
after.start()
tids = os.listdir("/proc/self/task")
nices = {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in tids}
ev.set()
print(sorted(nices), len(tids))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split(" ")
    assert out[0] == "[7]" and int(out[1]) >= 3
    with pytest.raises(ConfigError, match=r"nice.*-21"):
        parse_app_args({"decode": {"nice": -21}})
    assert parse_app_args({"prefill": {"nice": -5}}).prefill.nice == -5
