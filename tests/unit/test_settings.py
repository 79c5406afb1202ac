from __future__ import annotations

import pytest

from processgpt_sync import ConfigurationError, Settings


def test_agent_orch_is_required_and_the_error_names_the_variable():
    with pytest.raises(ConfigurationError, match="PROCESSGPT_AGENT_ORCH"):
        Settings.from_env({})


def test_environment_is_read_and_arguments_win():
    env = {"PROCESSGPT_AGENT_ORCH": "env-agent", "PROCESSGPT_WORKERS": "7",
           "PROCESSGPT_TIMEOUT": "2.5", "DATABASE_URL": "postgresql://x/db"}
    settings = Settings.from_env(env, workers=3)
    assert (settings.agent_orch, settings.workers, settings.timeout) == ("env-agent", 3, 2.5)
    assert settings.backend == "postgres"


def test_backend_selection_order():
    assert Settings(agent_orch="a").backend == "embedded"
    supa = Settings(agent_orch="a", supabase_url="https://x.supabase.co", supabase_key="k")
    assert supa.backend == "supabase"
    both = Settings(agent_orch="a", database_url="postgresql://x", supabase_url="https://x",
                    supabase_key="k")
    assert both.backend == "postgres"


def test_service_role_variable_is_accepted_and_the_key_is_not_in_repr():
    settings = Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "SUPABASE_URL": "https://x",
                                  "SUPABASE_SERVICE_ROLE_KEY": "secret-key"})
    assert settings.supabase_key == "secret-key"
    assert "secret-key" not in repr(settings)


@pytest.mark.parametrize(("env", "message"), [
    ({"PROCESSGPT_WORKERS": "many"}, r"PROCESSGPT_WORKERS='many' is not a valid int"),
    ({"PROCESSGPT_WORKERS": "0"}, "workers must be a positive whole number"),
    ({"SUPABASE_URL": "https://x"}, "SUPABASE_KEY is not set"),
])
def test_bad_values_get_specific_errors(env, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", **env})


@pytest.mark.parametrize(("options", "message"), [
    ({"agent_orch": 123}, "agent_orch must be a string, got int 123"),
    ({"database_url": 5}, "database_url must be a string, got int 5"),
    ({"supabase_key": b"k"}, "supabase_key must be a string, got bytes$"),
    ({"workers": 2.5}, "workers must be a positive whole number, got 2.5"),
    ({"workers": True}, "workers must be a positive whole number, got True"),
    ({"lease_seconds": 30.0}, "lease_seconds must be a positive whole number"),
    ({"max_running": 0}, "max_running must be a positive whole number"),
    ({"gc_threshold": 1.5}, "gc_threshold must be a whole number >= 0"),
    ({"grace_seconds": "5"}, "grace_seconds must be a finite number >= 0, got '5'"),
    ({"grace_seconds": float("inf")}, "grace_seconds must be a finite number >= 0, got inf"),
    ({"poll_interval": float("nan")}, "poll_interval must be a positive finite number"),
    ({"timeout": float("inf")}, "timeout must be a positive finite number, got inf"),
    ({"summarize_feedback": "x"}, "summarize_feedback must be a function"),
    ({"fair": "no"}, "fair must be True or False, got str 'no'"),
    ({"listen": 0}, "listen must be True or False, got int 0"),
    ({"transaction_pooler": "yes"}, "transaction_pooler must be True or False"),
    # PostgreSQL holds them as int milliseconds: longer fails every connection's set-up,
    # shorter rounds to 0, which is no limit
    ({"statement_timeout": 1e9}, "statement_timeout must be between 0.001 and 2,147,483 s"),
    ({"statement_timeout": 0.0001}, "statement_timeout must be between 0.001"),
    ({"tcp_timeout": 70_000}, "tcp_timeout must be between 0.001 and 65,534 s"),
])
def test_options_of_the_wrong_type_are_refused_when_the_settings_are_built(options, message):
    """Caught here, not on the first todo (summarize_feedback), in SQL (a fractional lease) or
    halfway through start (gc_threshold), where they would fail todos or leak threads."""
    with pytest.raises(ConfigurationError, match=message):
        Settings(**{"agent_orch": "a", **options})


def test_settings_and_options_together_are_refused():
    from processgpt_sync import start

    settings = Settings(agent_orch="a")
    with pytest.raises(ConfigurationError, match=r"not both \(given: workers\)"):
        start(print, settings=settings, workers=16)
    with pytest.raises(ConfigurationError,
                       match=r"settings must be a processgpt_sync\.Settings, got dict"):
        start(print, settings={"agent_orch": "a"})  # type: ignore[arg-type]


def test_unknown_option_is_named():
    with pytest.raises(ConfigurationError, match=r"unknown option.*lease_secs"):
        Settings.from_env({}, agent_orch="a", lease_secs=3)


def test_a_transaction_pooler_is_detected_by_port_or_set_explicitly():
    pooled = Settings(agent_orch="a",
                      database_url="postgresql://u:p@pooler.supabase.com:6543/postgres")
    assert pooled.behind_transaction_pooler
    direct = Settings(agent_orch="a", database_url="postgresql://u:p@db:5432/postgres")
    assert not direct.behind_transaction_pooler
    for url in ("postgresql://u:p@pooler.supabase.com:6543?sslmode=require",
                "postgresql://u:p@pooler.supabase.com:6543",
                "host=pooler.supabase.com port=6543 dbname=postgres"):
        assert Settings(agent_orch="a", database_url=url).behind_transaction_pooler, url
    for url in ("postgresql://u:p@db:65430/postgres", "host=db port=65431"):
        assert not Settings(agent_orch="a", database_url=url).behind_transaction_pooler, url
    forced = Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a",
                                "PROCESSGPT_TRANSACTION_POOLER": "yes",
                                "DATABASE_URL": "postgresql://u@db/x"})
    assert forced.behind_transaction_pooler


def test_a_yes_or_no_variable_that_is_neither_is_refused_not_read_as_no():
    """PROCESSGPT_FAIR=ture used to turn fairness off without a word."""
    assert Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "PROCESSGPT_FAIR": "off",
                              "PROCESSGPT_LISTEN": "No"}).fair is False
    assert Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "PROCESSGPT_LISTEN": "0"}
                             ).listen is False
    with pytest.raises(ConfigurationError, match="PROCESSGPT_FAIR='ture' is not true or false"):
        Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "PROCESSGPT_FAIR": "ture"})


def test_a_misspelt_variable_is_said_with_the_likely_name(caplog):
    """PROCESSGPT_DATABASE_URL (a Django setting's name) or a typo would be ignored without a
    word, and the server would serve the embedded database instead."""
    import logging

    with caplog.at_level(logging.WARNING, logger="processgpt_sync"):
        Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "PROCESSGPT_DATABASE_URL": "x",
                           "PROCESSGPT_WROKERS": "3", "PROCESSGPT_LOG_LEVEL": "INFO"})
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "PROCESSGPT_DATABASE_URL is not a processgpt-sync variable and is ignored "
        "(did you mean DATABASE_URL?)",
        "PROCESSGPT_WROKERS is not a processgpt-sync variable and is ignored "
        "(did you mean PROCESSGPT_WORKERS?)"]
