"""Actor configuration loading/validation and the SQLite store (real files, real SQLite)."""

import tomllib

import pytest
import sqlalchemy as sa
import trio

from keytrio.actors.common import config
from keytrio.actors.common.store import Store, sqlite_url

OPTIONS = [
    config.Option("quote_interval", "float", 2.0, "seconds between quotes", minimum=0.01),
    config.Option("max_retries", "int", 10, "retries before FAILED", minimum=0),
    config.Option("exponential_backoff", "bool", True, "delay n is retry_interval ** n"),
    config.Option("trusted_client_ca", "list", ["cacert.crt"], "CA files for client certificates"),
    config.Option("tpm_hash_alg", "choice", "sha256", "PCR bank", choices=("sha1", "sha256", "sha384", "sha512")),
    config.Option("ek_handle", "int_or_str", "generate", "generate or a persistent handle"),
    config.Option("webhook_url", "str", None, "where notices also go"),
]


def test_defaults_file_env_overrides(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('[verifier]\nquote_interval = 0.5\nek_handle = "0x81010001"\n')
    env = {"KEYTRIO_VERIFIER_MAX_RETRIES": "3", "KEYTRIO_VERIFIER_TRUSTED_CLIENT_CA": '["a.pem", "b.pem"]',
           "KEYTRIO_VERIFIER_EXPONENTIAL_BACKOFF": "false"}
    cfg = config.load("verifier", OPTIONS, f, env=env)
    assert cfg.quote_interval == 0.5 and cfg["max_retries"] == 3
    assert cfg.trusted_client_ca == ["a.pem", "b.pem"]
    assert cfg.exponential_backoff is False
    assert cfg.ek_handle == 0x81010001 and cfg.tpm_hash_alg == "sha256" and cfg.webhook_url is None
    assert config.load("verifier", OPTIONS, None, env={}, overrides={"quote_interval": 1}).quote_interval == 1.0


def test_every_problem_reported_at_once(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('quote_interval = "soon"\nmax_retries = -1\ntpm_hash_alg = "md5"\nbogus = 1\n')
    env = {"KEYTRIO_VERIFIER_EXPONENTIAL_BACKOFF": "yes", "KEYTRIO_VERIFIER_TRUSTED_CLIENT_CA": "a.pem"}
    with pytest.raises(config.ConfigError) as info:
        config.load("verifier", OPTIONS, f, env=env)
    text = "\n".join(info.value.problems)
    for needle in ("quote_interval", "max_retries", "tpm_hash_alg", "bogus", "EXPONENTIAL_BACKOFF", "TRUSTED_CLIENT_CA"):
        assert needle in text
    assert len(info.value.problems) == 6


def test_non_finite_numbers_are_refused_not_crashed_on(tmp_path):
    # TOML has nan and inf: nan passes any minimum/maximum comparison, and int(inf) raises
    # OverflowError, which once escaped the loader as a traceback (`port = inf`)
    f = tmp_path / "v.toml"
    f.write_text("quote_interval = nan\nmax_retries = inf\n")
    with pytest.raises(config.ConfigError) as info:
        config.load("verifier", OPTIONS, f, env={})
    assert info.value.problems == ["quote_interval: must be a finite number, not nan",
                                   "max_retries: must be an integer, not inf"]
    for value in ("inf", "-inf", "nan", "Infinity"):
        with pytest.raises(config.ConfigError, match="quote_interval: must be a finite number"):
            config.load("verifier", OPTIONS, None, env={"KEYTRIO_VERIFIER_QUOTE_INTERVAL": value})
    with pytest.raises(config.ConfigError, match="max_retries: must be an integer, not -inf"):
        config.load("verifier", OPTIONS, None, env={}, overrides={"max_retries": float("-inf")})


def test_paths_resolve_checks_and_names_too_long(tmp_path):
    # a name longer than the file system's NAME_MAX: is_file raises ENAMETOOLONG, resolve says
    # "no such file" like for any missing TLS file
    from keytrio.actors.registrar.config import load_config as registrar_config
    from keytrio.actors.registrar.config import resolve as resolve_registrar
    from keytrio.actors.verifier.config import load_config, resolve

    long = str(tmp_path / ("a" * 300))  # in a directory that exists (else ENOENT comes first)
    cfg = load_config(env={}, overrides={"data_dir": str(tmp_path), "server_cert": long, "crl": long,
                                         "trusted_client_ca": [long]})
    with pytest.raises(config.ConfigError) as info:
        resolve(cfg)
    assert [p.split(" ", 1)[0] for p in info.value.problems if long in p] == [
        "server_cert:", "trusted_client_ca:", "crl:"]
    cfg = registrar_config(env={}, overrides={"data_dir": str(tmp_path), "tpm_cert_store": long})
    with pytest.raises(config.ConfigError) as info:
        resolve_registrar(cfg)
    assert f"tpm_cert_store: no such directory {long}" in info.value.problems


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load("verifier", OPTIONS, tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("quote_interval = = 2")
    with pytest.raises(config.ConfigError):
        config.load("verifier", OPTIONS, bad, env={})


def test_default_config_text_is_valid_toml_and_loads(tmp_path):
    text = config.default_config_text("verifier", OPTIONS)
    assert "KEYTRIO_VERIFIER_" in text and "# seconds between quotes" in text
    tomllib.loads(text)
    f = tmp_path / "d.toml"
    f.write_text(text)
    assert config.load("verifier", OPTIONS, f, env={}).max_retries == 10


META = sa.MetaData()
ITEMS = sa.Table("items", META, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.String))


async def test_sqlite_store_commits_and_survives_reopen(tmp_path):
    url = sqlite_url(tmp_path / "db.sqlite")
    store = await Store.open(url, META)
    assert store.is_sqlite
    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(store.write, lambda c, i=i: c.execute(ITEMS.insert().values(id=i, v=str(i))))
    with pytest.raises(sa.exc.IntegrityError):
        await store.write(lambda c: (c.execute(ITEMS.insert().values(id=100, v="x")),
                                     c.execute(ITEMS.insert().values(id=1, v="dup"))))
    await store.close()
    store = await Store.open(url, META)
    rows = await store.read(lambda c: c.execute(sa.select(ITEMS.c.id).order_by(ITEMS.c.id)).scalars().all())
    assert rows == list(range(20))  # the failed transaction left nothing behind
    mode = await store.read(lambda c: c.exec_driver_sql("PRAGMA journal_mode").scalar())
    assert mode == "wal"
    await store.close()


async def test_grouped_writes_commit_each_caller_and_isolate_a_failure(tmp_path):
    url = sqlite_url(tmp_path / "db.sqlite")
    store = await Store.open(url, META)
    await store.write(lambda c: c.execute(ITEMS.insert().values(id=1000, v="there")))
    results: dict[int, object] = {}

    async def put(i: int) -> None:
        def txn(c):
            if i == 17:  # a duplicate key: only this caller may see the error
                c.execute(ITEMS.insert().values(id=1000, v="dup"))
            c.execute(ITEMS.insert().values(id=i, v=str(i)))
            return i * 2

        try:
            results[i] = await store.write_grouped(txn)
        except sa.exc.IntegrityError as exc:
            results[i] = exc

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(put, i)
    assert isinstance(results.pop(17), sa.exc.IntegrityError)
    assert results == {i: i * 2 for i in range(50) if i != 17}
    await store.close()
    store = await Store.open(url, META)  # committed: visible after a reopen
    rows = await store.read(lambda c: c.execute(sa.select(ITEMS.c.id).order_by(ITEMS.c.id)).scalars().all())
    assert rows == [i for i in range(50) if i != 17] + [1000]
    await store.close()


async def test_grouped_writes_cancelled_callers(tmp_path):
    # callers cancelled while waiting for a group write nothing; those that returned are committed
    store = await Store.open(sqlite_url(tmp_path / "db.sqlite"), META)
    returned: set[int] = set()

    async def put(i: int) -> None:
        await store.write_grouped(lambda c: c.execute(ITEMS.insert().values(id=i, v=str(i))))
        returned.add(i)

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(put, i)
        await trio.sleep(0)  # the first group has started; the rest queue behind it
        n.cancel_scope.cancel()
    rows = set(await store.read(lambda c: c.execute(sa.select(ITEMS.c.id)).scalars().all()))
    assert returned <= rows  # nothing acknowledged is lost
    assert rows and len(rows) < 40  # some were written, the queued ones were not
    await store.write_grouped(lambda c: c.execute(ITEMS.insert().values(id=99, v="after")))  # still usable
    assert 99 in set(await store.read(lambda c: c.execute(sa.select(ITEMS.c.id)).scalars().all()))
    await store.close()


async def test_grouped_writes_linger_collects_callers(tmp_path, autojump_clock):
    # with group_linger the leader waits for callers arriving after it: one transaction for all;
    # a caller cancelled while its leader lingers writes nothing and the group still commits
    store = await Store.open(sqlite_url(tmp_path / "db.sqlite"), META)
    store.group_linger = 0.5
    commits = []
    sa.event.listen(store.engine, "commit", lambda conn: commits.append(1))  # (worker thread)
    returned: set[int] = set()

    async def put(i: int, delay: float) -> None:
        await trio.sleep(delay)
        await store.write_grouped(lambda c: c.execute(ITEMS.insert().values(id=i, v=str(i))))
        returned.add(i)

    async with trio.open_nursery() as n:
        n.start_soon(put, 0, 0)  # the leader (cancelled during its linger below)
        for i in range(1, 10):
            n.start_soon(put, i, i * 0.04)
        await trio.sleep(0.2)
        n.cancel_scope.cancel()  # cancels the leader and the callers that had not arrived yet
    start = trio.current_time()
    async with trio.open_nursery() as n:
        for i in range(10, 20):
            n.start_soon(put, i, (i - 10) * 0.04)
    rows = set(await store.read(lambda c: c.execute(sa.select(ITEMS.c.id)).scalars().all()))
    assert rows == returned == set(range(10, 20))
    assert len(commits) == 1 and trio.current_time() - start >= 0.5 - 1e-9
    await store.close()


async def test_grouped_write_whose_group_broke_off_gets_not_run(tmp_path, autojump_clock):
    # a write of a group whose hand-off failed before it ran (here the leader's fn raises a
    # BaseException, which the group's one-by-one retry does not catch) is "not run", with its
    # own error each time (the outcome and the wake-up event of a write are made when needed)
    store = await Store.open(sqlite_url(tmp_path / "db.sqlite"), META)
    store.group_linger = 0.5
    got: dict[str, object] = {}

    def stop(c):
        raise SystemExit(3)

    async def leader() -> None:
        try:
            await store.write_grouped(stop)
        except SystemExit as exc:
            got["leader"] = exc.code

    async def follower(name: str, i: int) -> None:
        await trio.sleep(0.1)
        try:
            got[name] = await store.write_grouped(lambda c: c.execute(ITEMS.insert().values(id=i, v=name)))
        except RuntimeError as exc:
            got[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(leader)
        n.start_soon(follower, "a", 1)
        n.start_soon(follower, "b", 2)
    assert got["leader"] == 3
    assert [str(got[k]) for k in "ab"] == ["write_grouped: not run"] * 2
    assert got["a"] is not got["b"]
    assert await store.read(lambda c: c.execute(sa.select(ITEMS.c.id)).scalars().all()) == []
    # queued and committed by a committer task: the outcome arrives without a wait
    async with trio.open_nursery() as n:
        job = store.submit_grouped(lambda c: c.execute(ITEMS.insert().values(id=5, v="x")).rowcount, n)
        assert job.wake is None and job.outcome is None
    assert job.done and job.wake is None  # nobody waited: no event was ever made
    assert await store.collect(job) == 1
    await store.close()
