"""CPU runs use the cores they are given, whatever OMP_NUM_THREADS the launcher set."""

from __future__ import annotations

import os

import pytest

from vlp import distributed


@pytest.fixture
def cores(monkeypatch) -> int:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what accelerate launch and torchrun set
    return 8


def test_one_process_uses_every_core_it_may_run_on(cores, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.cpu_threads(0) == cores


def test_processes_on_one_node_share_its_cores(cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert distributed.cpu_threads(0) == cores // 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert distributed.cpu_threads(0) == 1  # never 0


def test_an_explicit_count_wins(cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpu_threads(3) == 3
