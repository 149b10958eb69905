"""A setting the service cannot run with stops each of its processes with status 2 and one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from inference_server.settings import EngineSettings
from tests.conftest import ROOT
from web.settings import config_from_env
from worker import contract
from worker.settings import WorkerSettings

INT, FLOAT = contract.env_int, contract.env_float


@pytest.mark.parametrize(
    ("read", "value", "expected"),
    [(INT, None, 7), (INT, "", 7), (INT, " 12 ", 12), (INT, "-3", -3), (FLOAT, "", 7), (FLOAT, "0.5", 0.5)],
)
def test_numbers_are_read_and_unset_or_empty_gives_the_default(read, value, expected):
    env = {} if value is None else {"SOME_SETTING": value}
    assert read(env, "SOME_SETTING", 7) == expected


@pytest.mark.parametrize(
    ("read", "value", "what"),
    [(INT, "x", "a whole number"), (INT, "1.5", "a whole number"), (INT, "1e3", "a whole number")]
    + [(INT, "12 s", "a whole number"), (FLOAT, "0,5", "a number"), (FLOAT, "nan", "a number")]
    + [(FLOAT, "inf", "a number"), (FLOAT, "-inf", "a number")],
)
def test_a_number_setting_refuses_anything_else_by_name(read, value, what):
    with pytest.raises(contract.SettingsError, match=f"SOME_SETTING must be {what}, not '{value}'"):
        read({"SOME_SETTING": value}, "SOME_SETTING", 7)


def test_settings_below_their_least_value_are_refused_by_name():
    assert contract.env_int({"SOME_SETTING": "1"}, "SOME_SETTING", 7, minimum=1) == 1
    with pytest.raises(contract.SettingsError, match="SOME_SETTING must be 1 or more, not 0"):
        contract.env_int({"SOME_SETTING": "0"}, "SOME_SETTING", 7, minimum=1)
    with pytest.raises(contract.SettingsError, match="SOME_SETTING must be 10 or less, not 11"):
        contract.env_int({"SOME_SETTING": "11"}, "SOME_SETTING", 7, minimum=1, maximum=10)
    assert contract.env_port({"SOME_PORT": "65535"}, "SOME_PORT", 80) == 65535
    with pytest.raises(contract.SettingsError, match="SOME_PORT must be 65535 or less, not 65536"):
        contract.env_port({"SOME_PORT": "65536"}, "SOME_PORT", 80)
    assert contract.env_float({"SOME_SETTING": "0"}, "SOME_SETTING", 0.25) == 0
    with pytest.raises(contract.SettingsError, match="SOME_SETTING must be 0 or more, not -0.5"):
        contract.env_float({"SOME_SETTING": "-0.5"}, "SOME_SETTING", 0.25)
    with pytest.raises(contract.SettingsError, match="SOME_SETTING must be more than 0, not 0"):
        contract.env_float({"SOME_SETTING": "0"}, "SOME_SETTING", 0.25, positive=True)


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"REDIS_URL": "redis://elsewhere:7000/2", "REDIS_PORT": "x"}, "redis://elsewhere:7000/2"),
        ({"REDIS_HOST": "cache", "REDIS_PORT": "", "REDIS_DB": ""}, "redis://cache:6379/0"),
        ({"REDIS_URL": "", "REDIS_HOST": "", "REDIS_PORT": "6380", "REDIS_DB": "1"}, "redis://127.0.0.1:6380/1"),
        ({}, contract.DEFAULT_REDIS_URL),
    ],
)
def test_the_redis_url_is_built_from_its_parts_when_not_given(env, url):
    assert contract.redis_url(env) == url


@pytest.mark.parametrize(
    ("value", "level"), [(None, "INFO"), ("", "INFO"), (" debug ", "DEBUG"), ("Warning", "WARNING")]
)
def test_the_log_level_is_read_in_any_case(value, level):
    assert contract.log_level({} if value is None else {"LOG_LEVEL": value}) == level


def test_a_default_max_tokens_over_max_new_tokens_is_refused():
    with pytest.raises(
        contract.SettingsError, match=r"DEFAULT_MAX_TOKENS \(2000\) may not be more than MAX_NEW_TOKENS"
    ):
        config_from_env({"DEFAULT_MAX_TOKENS": "2000", "MAX_NEW_TOKENS": "1024"})
    assert config_from_env({"DEFAULT_MAX_TOKENS": "1024", "MAX_NEW_TOKENS": "1024"})["DEFAULT_MAX_TOKENS"] == 1024


@pytest.mark.parametrize(
    ("env", "workers", "slots"),
    [
        ({}, 8, 8),
        ({"WORKER_CONCURRENCY": "", "FAIR_SHARE_SLOTS": "", "MAX_NUM_SEQS": "128"}, 8, 8),
        ({"MODEL_DEVICE": "cuda:1"}, 64, 64),
        ({"MODEL_DEVICE": "cuda", "MAX_NUM_SEQS": "128"}, 128, 128),
        ({"MODEL_DEVICE": "cuda", "WORKER_CONCURRENCY": "16"}, 16, 16),
        ({"MODEL_DEVICE": "cuda", "FAIR_SHARE_SLOTS": "200"}, 64, 200),
        ({"WORKER_CONCURRENCY": "4", "FAIR_SHARE_SLOTS": "0"}, 4, 0),
    ],
)
def test_workers_follow_the_engine_profile_and_the_fair_share_follows_the_workers(env, workers, slots):
    assert WorkerSettings.from_env(env).concurrency == workers
    assert config_from_env(env)["FAIR_SHARE_SLOTS"] == slots
    if env.get("MODEL_DEVICE", "cpu") != "cpu" and not env.get("WORKER_CONCURRENCY"):
        assert EngineSettings.from_env(env).max_num_seqs == workers  # one worker per sequence of the GPU's batch


def test_a_worker_count_drawn_from_a_bad_batch_size_is_refused_by_name():
    with pytest.raises(contract.SettingsError, match="MAX_NUM_SEQS must be 1 or more, not 0"):
        WorkerSettings.from_env({"MODEL_DEVICE": "cuda", "MAX_NUM_SEQS": "0"})
    with pytest.raises(contract.SettingsError, match="FAIR_SHARE_SLOTS must be 0 or more, not -1"):
        config_from_env({"FAIR_SHARE_SLOTS": "-1"})


def test_a_gpu_memory_fraction_over_1_is_refused():
    with pytest.raises(contract.SettingsError, match="GPU_MEMORY_UTILIZATION is a fraction, at most 1, not 90"):
        EngineSettings.from_env({"MODEL_DEVICE": "cuda", "GPU_MEMORY_UTILIZATION": "90"})


@pytest.mark.parametrize(("grace", "waited", "retries"), [("", 7.5, 10), ("4", 2.5, 5), ("0", 0, 0)])
def test_a_worker_waits_out_a_redis_outage_shorter_than_its_heartbeat_grace(grace, waited, retries):
    wait = WorkerSettings.from_env({"HEARTBEAT_GRACE": grace}).redis_outage_wait
    retry = contract.redis_retry(wait)
    assert retry.get_retries() == retries
    assert sum(retry._backoff.compute(failures) for failures in range(1, retries + 1)) == pytest.approx(waited)


def started(argv: list[str], **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOG_DIR": os.devnull, **settings}  # LOG_DIR: nothing may get as far as logging
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


WORKERS = [sys.executable, "-m", "worker"]
WEBHOOKS = [sys.executable, "-m", "worker.webhooks"]
ENGINE = [sys.executable, "-m", "inference_server", "prepare"]
DASHBOARD = [sys.executable, "-m", "web.dashboard"]
WEB = [  # as the Procfile starts it
    os.path.join(os.path.dirname(sys.executable), "gunicorn"),
    *("--worker-class", "gevent", "--bind", "127.0.0.1:0", "--preload", "web:create_app()"),
]
NO_CREDENTIALS = {"RQ_DASHBOARD_HOST": "0.0.0.0", "RQ_DASHBOARD_USERNAME": "", "RQ_DASHBOARD_PASSWORD": ""}


@pytest.mark.parametrize(
    ("argv", "settings", "line"),
    [
        (WORKERS, {"WORKER_THREADS": "eight"}, "invalid settings: WORKER_THREADS must be a whole number, not 'eight'"),
        (WEBHOOKS, {"WEBHOOK_TIMEOUT": "10s"}, "invalid settings: WEBHOOK_TIMEOUT must be a number, not '10s'"),
        (WEBHOOKS, {"LOG_LEVEL": "loud"}, "invalid settings: LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
        (
            WEBHOOKS,
            {"REDIS_URL": "", "REDIS_HOST": "127.0.0.1", "REDIS_DB": "first"},
            "invalid settings: REDIS_DB must be a whole number, not 'first'",
        ),
        (WEBHOOKS, {"WEBHOOK_WORKERS": "0"}, "invalid settings: WEBHOOK_WORKERS must be 1 or more, not 0"),
        (ENGINE, {"ENGINE_PORT": "0"}, "invalid engine settings: ENGINE_PORT must be 1 or more, not 0"),
        (ENGINE, {"ENGINE_PORT": "80010"}, "invalid engine settings: ENGINE_PORT must be 65535 or less, not 80010"),
        (DASHBOARD, {"REDIS_URL": "", "REDIS_PORT": "63 79"}, "REDIS_PORT must be a whole number, not '63 79'"),
        (DASHBOARD, {"RQ_DASHBOARD_PORT": "91810"}, "invalid settings: RQ_DASHBOARD_PORT must be 65535 or less"),
        (DASHBOARD, {"SERVICE_CPUS": "one"}, "invalid settings: SERVICE_CPUS: 'one' is not a list of CPUs"),
        (DASHBOARD, NO_CREDENTIALS, "invalid settings: refusing to serve rq-dashboard on 0.0.0.0 without credentials"),
        (WEB, {"MAX_BATCH": "many"}, "invalid settings: MAX_BATCH must be a whole number, not 'many'"),
        (WEB, {"SERVICE_CPUS": "0-4095"}, "invalid settings: SERVICE_CPUS=0-4095 names CPUs this process may not use"),
    ],
)
def test_a_process_with_a_bad_setting_stops_with_one_line_naming_it(argv, settings, line):
    out = started(argv, **settings)
    assert out.returncode == 2, out.stderr
    assert line in out.stderr
    assert "Traceback" not in out.stderr
