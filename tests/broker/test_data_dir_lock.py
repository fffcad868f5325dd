"""The data directory's lock, alone and in brokers running inside the test's own process."""

from __future__ import annotations

import os

import pytest
import trio

import client
from broker.config import BrokerConfig
from broker.data_dir_lock import LOCK_FILE, DataDirError, DataDirLock, DataDirLockedError
from broker.node import run_broker
from broker.storage import LogConfig
from client import Admin


def test_a_second_lock_is_refused_naming_the_directory_and_the_holder(tmp_path):
    data_dir = tmp_path / "data"
    lock = DataDirLock.acquire(data_dir)  # creates the missing directory
    try:
        with pytest.raises(DataDirLockedError) as refused:
            DataDirLock.acquire(data_dir)  # another open file description: refused
        assert refused.value.holder_pid == os.getpid()
        assert str(refused.value) == (
            f"data directory {data_dir} is in use by another broker (pid {os.getpid()})"
        )
    finally:
        lock.release()
    assert not lock.held
    lock.release()  # idempotent
    DataDirLock.acquire(data_dir).release()


def test_the_holder_replaces_a_previous_holders_pid(tmp_path):
    (tmp_path / LOCK_FILE).write_text("4294967295\nleft by a crashed broker\n")
    lock = DataDirLock.acquire(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_lock_file_without_a_pid_is_reported_as_unknown(tmp_path):
    lock = DataDirLock.acquire(tmp_path)
    try:
        (tmp_path / LOCK_FILE).write_text("")  # as between another holder's lock and write
        with pytest.raises(DataDirLockedError, match=r"\(pid unknown\)$"):
            DataDirLock.acquire(tmp_path)
    finally:
        lock.release()


def test_an_unusable_directory_is_a_data_dir_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataDirError, match="^cannot use data directory .*file/data: Not a dir"):
        DataDirLock.acquire(tmp_path / "file" / "data")


def _config(tmp_path) -> BrokerConfig:
    return BrokerConfig(
        port=0,
        http_port=-1,
        grpc_port=-1,
        data_dir=tmp_path / "data",
        log_defaults=LogConfig(fsync="never"),
    )


async def test_in_process_brokers_on_one_data_dir_exclude_each_other(tmp_path):
    config = _config(tmp_path)
    async with trio.open_nursery() as first_nursery:
        first = await first_nursery.start(run_broker, config)
        with pytest.raises(DataDirLockedError) as refused:
            await first_nursery.start(run_broker, config)  # fails before it starts
        assert refused.value.holder_pid == os.getpid()
        async with client.connect(f"127.0.0.1:{first.port}") as cluster:
            await Admin(cluster).create_topic("still-serving")  # the first one goes on
        first_nursery.cancel_scope.cancel()
    async with trio.open_nursery() as next_nursery:  # stopping released the lock
        await next_nursery.start(run_broker, config)
        next_nursery.cancel_scope.cancel()
