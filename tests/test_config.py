"""filterd.config: defaults, loading, overrides, one-line errors naming file and key, cross-key checks."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from filterd.config import (
    Config,
    HostPort,
    RedisConfig,
    check_config,
    config_reference,
    format_duration,
    is_loopback,
    load_config,
    parse_duration,
    parse_hostport,
    redact_url,
)
from filterd.errors import ConfigError

FULL = """\
[model]
path = "/srv/filterd/models/current"
device = "cpu"
dtype = "float32"
poll_interval = "500ms"
threshold = 0.7

[batching]
max_batch_size = 32
max_batch_tokens = 4096
max_wait_ms = 2.5
max_queue = 1000

[redis]
enabled = true
url = "rediss://filterd:s3cret@redis.example.org:6380/2"
in_stream = "sms:in"
out_stream = "sms:out"
dead_stream = "sms:dead"
label_stream = "sms:labels"
group = "sms-filter"
consumer = "worker-1"
model_channel = "sms:model"
block_ms = 500
count = 16
claim_idle_ms = 30000
max_deliveries = 3
max_text_bytes = 4096
out_maxlen = 100000

[redis.routes]
spam = "sms:spam"
ham = "sms:ham"

[smtp]
enabled = true
listen = "[::1]:10025"
next_hop = "localhost:10026"
action = "quarantine"
quarantine_rcpt = "quarantine@example.org"
subject_prefix = "***SPAM*** "
max_message_bytes = 10240000
max_recipients = 500
timeout = "1h30m"
on_error = "tempfail"

[metrics]
listen = "127.0.0.1:19464"

[trainer]
store = "labels.sqlite"
models_dir = "/srv/filterd/models"
interval = "1d"
metrics_listen = "127.0.0.1:19465"
min_new_labels = 50
mode = "last-block"
max_regression = 0
max_ham_fpr = 0.05
min_per_class = 10
keep = 3
golden_set = "golden.csv"
group = "trainer"

[logging]
level = "debug"
"""


def write(tmp_path: Path, text: str, name: str = "filterd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path, overrides=(), check: bool = False) -> str:
    with pytest.raises(ConfigError) as e:
        (check_config if check else load_config)(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---- defaults and the full example


def test_defaults_are_the_documented_ones():
    c = load_config(None)
    assert c == Config()
    assert (c.model.path, c.model.device, c.model.dtype) == (Path("/var/lib/filterd/models/current"), "auto", "auto")
    assert c.model.poll_interval == 2.0 and c.model.threshold is None
    assert (c.batching.max_batch_size, c.batching.max_batch_tokens, c.batching.max_wait_ms, c.batching.max_queue) == (
        64,
        8192,
        5,
        4096,
    )
    r = c.redis
    assert r.enabled and r.url == "redis://127.0.0.1:6379/0"
    assert (r.in_stream, r.out_stream, r.dead_stream, r.label_stream) == (
        "filterd:in",
        "filterd:out",
        "filterd:dead",
        "filterd:labels",
    )
    assert (r.group, r.consumer, r.model_channel) == ("filterd", "", "filterd:model")
    assert (r.block_ms, r.count, r.claim_idle_ms, r.max_text_bytes, r.out_maxlen) == (1000, 64, 60000, 65536, 0)
    assert r.routes.as_dict() == {}
    s = c.smtp
    assert s.enabled and s.listen == ("127.0.0.1", 10025) and str(s.next_hop) == "127.0.0.1:10026"
    assert (s.action, s.quarantine_rcpt, s.max_message_bytes, s.max_recipients, s.timeout, s.on_error) == (
        "tag",
        "",
        26214400,
        1000,
        300.0,
        "accept",
    )
    assert str(c.metrics.listen) == "127.0.0.1:9464"
    t = c.trainer
    assert (t.store, t.models_dir, t.interval, str(t.metrics_listen)) == (
        Path("/var/lib/filterd/labels.sqlite"),
        Path("/var/lib/filterd/models"),
        3600.0,
        "127.0.0.1:9465",
    )
    assert (t.min_new_labels, t.mode, t.max_regression, t.max_ham_fpr, t.min_per_class, t.keep, t.golden_set, t.group) == (
        100,
        "auto",
        0.01,
        0.02,
        20,
        5,
        None,
        "filterd-trainer",
    )
    assert c.logging.level == "info"
    assert check_config(None) == c and c.warnings() == []


def test_full_example_loads_typed_with_paths_relative_to_the_file(tmp_path):
    c = check_config(write(tmp_path, FULL))
    assert c.model.poll_interval == 0.5 and c.model.threshold == 0.7
    assert c.batching.max_wait_ms == 2.5 and isinstance(c.batching.max_wait_ms, float)
    assert c.redis.routes.get("spam") == "sms:spam" and c.redis.routes.get("ham") == "sms:ham"
    assert c.redis.consumer_name() == "worker-1"
    assert c.smtp.listen == HostPort("::1", 10025) and str(c.smtp.listen) == "[::1]:10025"
    assert c.smtp.timeout == 5400.0 and c.trainer.interval == 86400.0
    assert c.trainer.max_regression == 0.0 and isinstance(c.trainer.max_regression, float)  # int accepted for a float
    assert c.trainer.store == tmp_path / "labels.sqlite" and c.trainer.golden_set == tmp_path / "golden.csv"
    assert c.model.resolved_dtype("cuda") == "float32"


def test_to_toml_round_trips_and_redacts_passwords(tmp_path):
    full = load_config(write(tmp_path, FULL))
    for cfg in (Config(), full):
        assert load_config(write(tmp_path, cfg.to_toml(redact=False), "dump.toml")) == cfg
    dumped = full.to_toml()
    assert "s3cret" not in dumped and "rediss://filterd:***@redis.example.org:6380/2" in dumped
    assert 'timeout = "90m"' in dumped and "max_wait_ms = 2.5" in dumped and "[redis.routes]" in dumped
    assert "max_wait_ms = 5  #" in Config().to_toml()


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().batching.max_batch_size = 1  # type: ignore[misc]


def test_reference_lists_every_key_with_its_default():
    ref = config_reference()
    assert "| `[batching] max_wait_ms` | `5` |" in ref and '| `[redis.routes] spam` | `""` |' in ref
    assert '| `[trainer] interval` | `"1h"` |' in ref
    assert ref.count("\n| `[") == sum(1 for line in Config().to_toml().splitlines() if " = " in line)


def test_small_helpers():
    assert Config().model.resolved_dtype("cuda") == "bfloat16" and Config().model.resolved_dtype("cpu") == "float32"
    assert RedisConfig().consumer_name() == socket.gethostname()  # stable across restarts (issue 12, point 8)
    assert RedisConfig().routes.get("spam") is None and RedisConfig().routes.get("error") is None


# ---- overrides


def test_override_forms(tmp_path):
    c = load_config(
        None,
        [
            "batching.max_batch_size=32",
            "redis.enabled=false",
            "redis.url=redis://127.0.0.1:6390/0",
            "redis.routes.spam=sms:spam",
            "redis.group=2024",  # reads as an integer in TOML; the key wants a name
            'smtp.action="subject"',
            "smtp.subject_prefix=[SPAM] ",  # not TOML: taken as text, trailing space kept
            "trainer.interval=90",
            "model.threshold=0.25",
            "model.path=models/x",  # relative to the working directory, not a file
        ],
    )
    assert c.batching.max_batch_size == 32 and c.redis.enabled is False
    assert c.redis.url == "redis://127.0.0.1:6390/0" and c.redis.routes.as_dict() == {"spam": "sms:spam"}
    assert c.redis.group == "2024" and c.smtp.action == "subject" and c.smtp.subject_prefix == "[SPAM] "
    assert c.trainer.interval == 90.0 and c.model.threshold == 0.25 and c.model.path == Path("models/x")


def test_overrides_apply_over_the_file_in_order(tmp_path):
    path = write(tmp_path, FULL)
    c = load_config(path, ["batching.max_batch_size=8", "batching.max_batch_size=16", 'redis.routes={ham = "h"}'])
    assert c.batching.max_batch_size == 16 and c.batching.max_queue == 1000
    assert c.redis.routes.as_dict() == {"ham": "h"}  # a table value replaces the whole table
    assert load_config(path, ["redis.routes.spam=x"]).redis.routes.as_dict() == {"spam": "x", "ham": "sms:ham"}


@pytest.mark.parametrize("override", ["nokey", "=3", "batching=3", "batching..max_wait_ms=3", "batching.max wait=3"])
def test_bad_override_syntax(override):
    assert config_error(None, [override]).startswith(f"--set {override}: expected section.key=value")


@pytest.mark.parametrize(
    "override, message",
    [
        ("batching.max_batch_size=0", "--set batching.max_batch_size: [batching] max_batch_size: must be an integer >= 1, got 0"),
        (
            "batching.max_batch_szie=3",
            "--set batching.max_batch_szie: [batching] max_batch_szie: unknown key (did you mean max_batch_size?)",
        ),
        ("batchin.max_wait_ms=3", "--set batchin.max_wait_ms: [batchin]: unknown section (did you mean [batching]?)"),
        ("redis.routes.spma=x", "--set redis.routes.spma: [redis.routes] spma: unknown key (did you mean spam?)"),
        ("redis.url.db=1", "--set redis.url.db: [redis] url: is a value, not a table"),
        ("redis.enabled=yes", '--set redis.enabled: [redis] enabled: must be true or false, got "yes"'),
        ("redis.routes=x", '--set redis.routes: [redis] routes: must be a table [redis.routes], got "x"'),
    ],
)
def test_bad_override_values_name_the_override_and_key(override, message):
    assert config_error(None, [override]) == message


def test_file_errors_are_reported_before_overrides(tmp_path):
    path = write(tmp_path, "[batching]\nmax_wait_ms = -1\n")
    assert config_error(path, ["batching.max_wait_ms=1"]).startswith(f"{path}: [batching] max_wait_ms:")


# ---- errors from a file: one line, naming the file and the key

BAD = [
    ('[batching]\nmax_wait_ms = "fast"', '[batching] max_wait_ms: must be a number >= 0, got "fast"'),
    ("[batching]\nmax_batch_szie = 3", "[batching] max_batch_szie: unknown key (did you mean max_batch_size?)"),
    ("[batching]\nmax_batch_size = true", "[batching] max_batch_size: must be an integer >= 1, got true"),
    ("[batching]\nmax_batch_size = 2.0", "[batching] max_batch_size: must be an integer >= 1, got 2.0"),
    ("[batching]\nmax_batch_tokens = 512", "[batching] max_batch_tokens: must be an integer >= 1024"),
    ("[batchin]\nmax_wait_ms = 1", "[batchin]: unknown section (did you mean [batching]?)"),
    ("[redis]\nmax_wait_ms = 1", "[redis] max_wait_ms: unknown key (it belongs in [batching])"),
    ("threshold = 0.5", "threshold: unknown top-level key (set it in [model])"),
    ("batching = 5", "[batching]: must be a table [batching], got 5"),
    ('[model]\ndevice = "gpu"', '[model] device: must be one of auto, cpu, cuda, got "gpu"'),
    ('[model]\ndtype = "float16"', '[model] dtype: must be one of auto, float32, bfloat16, got "float16"'),
    ('[model]\npath = ""', '[model] path: must be a path, not empty, got ""'),
    ("[model]\nthreshold = 1.5", '[model] threshold: must be "model"'),
    ('[smtp]\naction = "tagg"', '[smtp] action: must be one of tag, subject, quarantine, discard, reject, got "tagg"'),
    ('[smtp]\non_error = "bounce"', "[smtp] on_error: must be one of accept, tempfail"),
    ('[smtp]\nlisten = "127.0.0.1:99999"', "[smtp] listen: must be host:port (port must be a number in 1..65535)"),
    ('[smtp]\nlisten = "::1:25"', "[smtp] listen: must be host:port (an IPv6 address needs brackets"),
    ('[smtp]\nnext_hop = "mx.example.org"', '[smtp] next_hop: must be host:port (missing :port), got "mx.example.org"'),
    ("[smtp]\nlisten = 10025", "[smtp] listen: must be host:port"),
    ('[smtp]\nquarantine_rcpt = "a b@example.org"', "[smtp] quarantine_rcpt: must be an address"),
    (
        '[smtp]\nsubject_prefix = "x\\r\\nBcc: victim@example.org"',
        "[smtp] subject_prefix: must be a string without control characters",
    ),
    ('[smtp]\ntimeout = "5 minutes"', '[smtp] timeout: must be a duration such as "500ms"'),
    ('[smtp]\ntimeout = "0s"', "[smtp] timeout: must be a duration > 0"),
    ('[trainer]\ninterval = "-1h"', "[trainer] interval: must be a duration"),
    ('[trainer]\nmode = "everything"', "[trainer] mode: must be one of auto, head, last-block, last-2-blocks, all"),
    ("[trainer]\nmax_ham_fpr = 2", "[trainer] max_ham_fpr: must be a number in 0..1, got 2"),
    ("[trainer]\nkeep = 0", "[trainer] keep: must be an integer >= 1, got 0"),
    ('[redis]\nurl = "http://127.0.0.1:6379"', "[redis] url: must be a URL starting with redis://, rediss:// or unix://"),
    (
        '[redis]\nurl = "redis://:hunter2@127.0.0.1:99999/0"',
        '[redis] url: must have a port in 1..65535, got "redis://:***@127.0.0.1:99999/0"',
    ),
    ('[redis]\nurl = "redis://127.0.0.1:6379/zero"', "[redis] url: must end with a database number"),
    ('[redis]\nurl = "unix://"', "[redis] url: must name a socket path"),
    ('[redis]\nin_stream = ""', '[redis] in_stream: must be a stream name without spaces, not empty, got ""'),
    ('[redis]\nout_stream = "filterd out"', "[redis] out_stream: must be a stream name without spaces"),
    ("[redis]\nblock_ms = 0", "[redis] block_ms: must be an integer >= 1, got 0"),
    ("[redis]\nout_maxlen = -1", "[redis] out_maxlen: must be an integer >= 0, got -1"),
    ('[redis]\nroutes = "sms:spam"', '[redis] routes: must be a table [redis.routes], got "sms:spam"'),
    ('[redis.routes]\nerror = "x"', "[redis.routes] error: unknown key"),
    ("[redis.routes]\nspam = 1", "[redis.routes] spam: must be a stream name without spaces, got 1"),
    ('[logging]\nlevel = "INFO"', "[logging] level: must be one of debug, info, warning, error"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    assert config_error(path).startswith(f"{path}: {message}")


def test_toml_syntax_error_keeps_line_and_column(tmp_path):
    path = write(tmp_path, "[batching]\nmax_batch_size = 64\nmax_wait_ms = = 5\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ") and "line 3" in message and "column" in message


def test_duplicate_key_is_a_toml_error(tmp_path):
    assert "invalid TOML" in config_error(write(tmp_path, "[smtp]\naction = 'tag'\naction = 'reject'\n"))


def test_unreadable_files(tmp_path):
    assert config_error(tmp_path / "missing.toml") == f"{tmp_path / 'missing.toml'}: cannot read (No such file or directory)"
    assert config_error(tmp_path).startswith(f"{tmp_path}: cannot read (")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[smtp]\nsubject_prefix = "\xe9"\n')
    assert config_error(latin1) == f"{latin1}: not UTF-8 text (byte 0xe9 at offset 25)"


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[batching]\nmax_batch_size = 8\n".encode())
    assert load_config(path).batching.max_batch_size == 8


# ---- checks across keys (check_config only: load_config reads what each key says)

CROSS = [
    ('[smtp]\naction = "quarantine"', '[smtp] quarantine_rcpt: required when action = "quarantine"'),
    ("[smtp]\nenabled = false\n[redis]\nenabled = false", "[smtp] enabled: every ingress ([smtp], [redis], [milter], [http]) is disabled"),
    ('[smtp]\nnext_hop = "127.0.0.1:10025"', "[smtp] next_hop: 127.0.0.1:10025 is filterd's own listen address"),
    ('[smtp]\nlisten = "0.0.0.0:10025"\nnext_hop = "localhost:10025"', "[smtp] next_hop: localhost:10025 is filterd's own"),
    ('[metrics]\nlisten = "127.0.0.1:10025"', "[metrics] listen: 127.0.0.1:10025 is also [smtp] listen"),
    ('[trainer]\nmetrics_listen = "localhost:9464"', "[trainer] metrics_listen: localhost:9464 is also [metrics] listen"),
    ('[redis]\nout_stream = "filterd:in"', '[redis] out_stream: "filterd:in" is also in_stream'),
    ('[redis.routes]\nspam = "filterd:in"', '[redis.routes] spam: "filterd:in" is also in_stream'),
    ('[redis]\nlabel_stream = "filterd:in"', '[redis] label_stream: "filterd:in" is also in_stream'),
    ('[redis]\ndead_stream = "filterd:labels"', '[redis] dead_stream: "filterd:labels" is also label_stream'),
    ("[redis]\ncount = 100\n[batching]\nmax_queue = 50", "[redis] count: must be <= [batching] max_queue (50), got 100"),
]


@pytest.mark.parametrize("text, message", CROSS, ids=[m.split(":")[0] for _, m in CROSS])
def test_cross_key_checks(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    load_config(path)  # each key is valid on its own
    assert config_error(path, check=True).startswith(f"{path}: {message}")


def test_cross_key_checks_blame_the_override_that_broke_them(tmp_path):
    message = config_error(write(tmp_path, FULL), ["smtp.quarantine_rcpt="], check=True)
    assert message == '--set smtp.quarantine_rcpt: [smtp] quarantine_rcpt: required when action = "quarantine"'


def test_cross_key_checks_skip_disabled_ingresses():
    check_config(None, ["smtp.enabled=false", 'smtp.action="quarantine"', "smtp.next_hop=127.0.0.1:10025"])
    check_config(None, ["redis.enabled=false", "redis.out_stream=filterd:in"])


# ---- warnings: valid, but worth a look


def test_warnings_for_exposed_listeners_and_plaintext_redis():
    c = check_config(
        None,
        [
            "smtp.listen=0.0.0.0:10025",
            "metrics.listen=[::]:9464",
            "trainer.metrics_listen=192.0.2.7:9465",
            "redis.url=redis://:pw@10.0.0.5:6379/0",
            'smtp.action="reject"',
        ],
    )
    w = c.warnings()
    assert len(w) == 5 and all("\n" not in x for x in w)
    assert w[0].startswith('[smtp] listen = "0.0.0.0:10025" is not a loopback address') and "open relay" in w[0]
    assert w[1].startswith('[metrics] listen = "[::]:9464" is not a loopback address')
    assert w[2].startswith('[trainer] metrics_listen = "192.0.2.7:9465"')
    assert "rediss://" in w[3] and "pw" not in w[3]
    assert "backscatter" in w[4]
    assert check_config(None, ["smtp.listen=localhost:10025", "redis.url=rediss://10.0.0.5:6379/0"]).warnings() == []
    assert check_config(None, ["smtp.listen=0.0.0.0:10025", "smtp.enabled=false"]).warnings() == []


# ---- value parsers


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("1.5s", 1.5),
        ("0.25", 0.25),
        ("30", 30.0),
        (" 5s ", 5.0),
        (30, 30.0),
        (0.5, 0.5),
        ("0s", 0.0),
        ("5ms", 0.005),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "5", "5 minutes", "1w", "-1s", "5S", "1h-5m", "1e3s", True, None, -1, float("inf"), "nan"]
)
def test_parse_duration_rejects(text):
    if text == "5":
        assert parse_duration(text) == 5.0  # a bare number of seconds is fine (the control case)
        return
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds, text", [(3600, "1h"), (86400, "1d"), (300, "5m"), (90, "90s"), (0.5, "500ms"), (0, "0s"), (0.0001, "0.0001s")]
)
def test_format_duration_is_short_and_round_trips(seconds, text):
    assert format_duration(seconds) == text and parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:10025", ("127.0.0.1", 10025)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:25", ("localhost", 25)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::]:65535", ("::", 65535)),
        ("mx-1.example.org:2525", ("mx-1.example.org", 2525)),
    ],
)
def test_parse_hostport(text, expected):
    hp = parse_hostport(text)
    assert hp == expected and str(hp) == text


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:",
        ":9464",
        "::1:9464",
        "[::1]",
        "[::1:9464",
        "[nothost]:1",
        "300.1.1.1:25",
        "127.1:25",
        "bad host:25",
        "-bad.example:25",
        "host:25x",
        "host:+25",
        "host:٢٥",
        "",
        9464,
    ],
)
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text)  # type: ignore[arg-type]


def test_is_loopback_and_redact_url():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.5.5.5", "::1", "::ffff:127.0.0.1", "LOCALHOST."]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org", "2001:db8::1"]))
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_policy_client_restrictions_load_dump_and_reference(tmp_path):
    text = ('[policy]\nallow_senders = ["Boss@Bücher.example"]\nallow_senders_require = "authenticated_or_trusted_networks"\n'
            'trusted_networks = ["127.0.0.0/8", "::1", "2001:DB8::/32"]\n')  # fmt: skip
    c = load_config(write(tmp_path, text))
    assert c.policy.allow_senders_require == "authenticated_or_trusted_networks"
    assert c.policy.trusted_networks == ("127.0.0.0/8", "::1", "2001:DB8::/32")  # kept as written, checked at load
    assert c.policy.allow_senders == ("Boss@Bücher.example",)
    assert load_config(write(tmp_path, c.to_toml(redact=False), "dump.toml")) == c
    assert Config().policy.allow_senders_require == "none" and Config().policy.trusted_networks == ()
    ref = config_reference()
    assert '| `[policy] allow_senders_require` | `"none"` |' in ref and "| `[policy] trusted_networks` | `[]` |" in ref
    assert config_error(write(tmp_path, '[policy]\ntrusted_networks = ["192.0.2.0/24", "192.0.2.1/24"]\n')).endswith(
        "[policy] trusted_networks: not a network: '192.0.2.1/24' (host bits set: 192.0.2.0/24?), got an array"
    )
    assert config_error(write(tmp_path, '[policy]\ndeny_senders = ["ok.example", "x@.partner.example"]\n')).startswith(
        f"{tmp_path / 'filterd.toml'}: [policy] deny_senders: not an address or domain: 'x@.partner.example'"
    )
