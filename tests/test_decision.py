"""filterd.policy.decision: one spam decision from [policy] for every door (levels, soft reject, lists, doors)."""

from __future__ import annotations

import dataclasses

import pytest

from filterd.cli import main
from filterd.config import check_config
from filterd.policy.decision import ACTIONS, Decision, Message, Policy, decide
from filterd.errors import ConfigError


def policy(*sets: str) -> Policy:
    return Policy.from_config(check_config(None, ["redis.enabled=false", "smtp.quarantine_rcpt=q@x.org", *sets]))


def action(p: Policy, score: float, source: str = "milter", threshold: float = 0.5) -> str:
    return p.decide(Message(source), score, threshold).action


LEVELS = ["policy.tag_score=0.5", "policy.subject_score=0.7", "policy.quarantine_score=0.8",
          "policy.discard_score=0.9", "policy.reject_score=0.95"]  # fmt: skip


# --- levels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score, expected",
    [(0.0, "pass"), (0.4999, "pass"), (0.5, "tag"), (0.6999, "tag"), (0.7, "subject"), (0.8, "quarantine"),
     (0.8999, "quarantine"), (0.9, "discard"), (0.95, "reject"), (1.0, "reject")],
)  # fmt: skip
def test_each_level_starts_exactly_at_its_score(score, expected):
    d = policy(*LEVELS).decide(Message("milter"), score, 0.5)
    assert d.action == expected
    assert d.verdict == ("spam" if score >= 0.5 else "ham") and d.score == score and d.threshold == 0.5
    assert len(d.reasons) == 1 and d.reasons[0].startswith(f"score {score:.4f}")


def test_default_policy_is_todays_behaviour_tag_at_the_models_threshold():
    p = policy()
    for source in ("smtp", "milter", "http", "redis"):
        assert action(p, 0.6999, source, threshold=0.7) == "pass"
        d = p.decide(Message(source), 0.7, 0.7)
        assert (d.verdict, d.action, d.threshold) == ("spam", "tag", 0.7)
    assert decide(Message("smtp"), 0.2, None, 0.2).action == "tag"  # module function, default policy


def test_a_level_below_the_spam_threshold_acts_at_the_threshold():
    p = policy("policy.subject_score=0.3")  # tag = "model"; the model says 0.6
    assert action(p, 0.5, threshold=0.6) == "pass"  # ham is never acted on
    assert action(p, 0.6, threshold=0.6) == "subject"


def test_soft_reject_band_below_the_spam_threshold():
    p = policy("policy.soft_reject_score=0.3", "policy.tag_score=0.5", "policy.reject_score=0.9")
    assert action(p, 0.2999) == "pass"
    d = p.decide(Message("milter"), 0.3, 0.5)
    assert (d.verdict, d.action) == ("ham", "soft-reject")  # unsure: deferred, not spam
    assert action(p, 0.4999) == "soft-reject"
    assert action(p, 0.5) == "tag"
    assert action(p, 0.9) == "reject"


def test_soft_reject_band_between_levels_and_ties():
    p = policy("policy.tag_score=0.5", "policy.soft_reject_score=0.6", "policy.subject_score=0.8")
    assert [action(p, s) for s in (0.55, 0.6, 0.79, 0.8)] == ["tag", "soft-reject", "soft-reject", "subject"]
    tie = policy("policy.tag_score=0.5", "policy.soft_reject_score=0.5")
    assert action(tie, 0.5) == "tag"  # at a tie the other level wins


# --- doors -----------------------------------------------------------------------------


def test_per_door_overrides():
    p = policy("policy.tag_score=0.5", "policy.subject_score=0.8", "policy.redis.tag_score=0.9", "policy.redis.subject_score=0.95",
               "policy.http.subject_score=off", "policy.smtp.quarantine_score=0.85")  # fmt: skip
    assert [action(p, s, "redis") for s in (0.85, 0.9, 0.95)] == ["pass", "tag", "subject"]
    assert action(p, 0.85, "http") == "tag"
    assert action(p, 0.85, "milter") == "subject"
    assert action(p, 0.85, "smtp") == "quarantine"
    assert p.decide(Message("redis"), 0.85, 0.5).verdict == "ham"


def test_doors_skip_what_they_cannot_do():
    p = policy("policy.tag_score=0.5", "policy.quarantine_score=0.8", "policy.reject_score=0.9",
               "policy.soft_reject_score=0.3", "smtp.quarantine_rcpt=q@x.org")  # fmt: skip
    assert action(p, 0.95, "milter") == "reject" and action(p, 0.95, "http") == "reject"
    assert action(p, 0.95, "smtp") == "quarantine"  # after the queue: [policy] reject_score is not for it
    assert action(p, 0.95, "redis") == "quarantine"  # nobody to refuse
    assert action(p, 0.4, "milter") == "soft-reject"
    assert action(p, 0.4, "smtp") == "pass" and action(p, 0.4, "redis") == "pass"  # no band there
    assert p.actions("smtp") == {"pass", "tag", "quarantine"}
    assert p.actions("milter") == {"pass", "soft-reject", "tag", "quarantine", "reject"}
    own = policy("policy.tag_score=0.5", "policy.smtp.reject_score=0.9")
    assert action(own, 0.95, "smtp") == "reject"  # its own section: before-queue use (smtpd_proxy_filter)


def test_legacy_smtp_action_and_model_threshold_map_onto_the_policy():
    p = policy('smtp.action="subject"', "model.threshold=0.7")
    assert action(p, 0.6999, "smtp") == "pass"
    assert action(p, 0.7, "smtp") == "subject"
    assert action(p, 0.7, "redis") == "tag"  # [smtp] action is the smtp door's only
    assert action(p, 0.65, "redis", threshold=0.6) == "pass"  # [model] threshold overrides the model's own
    legacy = policy('smtp.action="discard"')
    assert action(legacy, 0.5, "smtp") == "discard" and action(legacy, 0.4999, "smtp") == "pass"


def test_check_config_prints_a_deprecation_line_per_old_key(tmp_path, capsys):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[model]\nthreshold = 0.7\n[smtp]\naction = "reject"\n[redis]\nenabled = false\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "deprecated: [model] threshold is deprecated: set [policy] tag_score = 0.7 instead" in err
    assert any(line.startswith("deprecated: [smtp] action is deprecated") and "reject_score = 0.7" in line for line in err)
    assert any("backscatter" in line for line in err)  # the warning stays
    cfg.write_text("[policy]\ntag_score = 0.7\n[redis]\nenabled = false\n")
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert "deprecat" not in capsys.readouterr().err


# --- lists -----------------------------------------------------------------------------


LISTS = ['policy.allow_senders=["boss@Example.COM", "friends.example"]', 'policy.deny_senders=["spam.example"]',
         'policy.allow_recipients=["postmaster@ours.example"]', 'policy.deny_recipients=["trap@ours.example"]',
         "policy.tag_score=0.5", "policy.quarantine_score=0.9", "policy.milter.reject_score=0.95"]  # fmt: skip


@pytest.mark.parametrize(
    "sender, rcpts, verdict, act, listed",
    [
        ("boss@example.com", ("a@ours.example",), "ham", "pass", "allow_senders"),  # by address
        ("BOSS@EXAMPLE.COM", ("a@ours.example",), "ham", "pass", "allow_senders"),  # case-insensitive
        ("other@example.com", ("a@ours.example",), None, None, ""),  # another address there: scored
        ("x@Friends.Example", ("a@ours.example",), "ham", "pass", "allow_senders"),  # by domain
        ("x@mail.friends.example", ("a@ours.example",), "ham", "pass", "allow_senders"),  # and its subdomains
        ("x@notfriends.example", ("a@ours.example",), None, None, ""),  # a suffix is not a subdomain
        ("x@SPAM.example", ("a@ours.example",), "spam", "reject", "deny_senders"),  # the door's top level
        ("x@a.com", ("postmaster@ours.example",), "ham", "pass", "allow_recipients"),
        ("x@a.com", ("postmaster@ours.example", "a@ours.example"), None, None, ""),  # every recipient must be
        ("x@a.com", ("a@ours.example", "Trap@Ours.Example"), "spam", "reject", "deny_recipients"),  # one trap is enough
        ("x@spam.example", ("postmaster@ours.example",), "ham", "pass", "allow_recipients"),  # allow wins over deny
        ("", ("a@ours.example",), None, None, ""),  # the null sender matches nothing
    ],
)
def test_allow_and_deny_lists(sender, rcpts, verdict, act, listed):
    p = policy(*LISTS)
    m = Message("milter", sender, rcpts)
    d = p.listed(m)
    if verdict is None:
        assert d is None and p.decide(m, 0.1).action == "pass"
        return
    assert d is not None and (d.verdict, d.action, d.score, d.listed) == (verdict, act, None, listed)
    assert p.decide(m, 0.1) == d == p.decide(m, 0.99)  # the model's score does not matter
    assert listed in d.reasons[0] and d.reasons[1] == "not scored"


def test_deny_listed_gets_each_doors_top_level():
    p = policy(*LISTS, "smtp.quarantine_rcpt=q@x.org")
    m = dataclasses.replace(Message("milter", "x@spam.example"))
    assert {s: p.decide(dataclasses.replace(m, source=s), None).action for s in ("milter", "http", "smtp", "redis")} == {
        "milter": "reject", "http": "quarantine", "smtp": "quarantine", "redis": "quarantine",
    }  # fmt: skip


def test_no_score_and_no_list_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="no score"):
        policy().decide(Message("smtp"), None)
    with pytest.raises(ValueError, match="source must be one of smtp, milter, http, redis"):
        Message("sms")


def test_decision_is_frozen_and_actions_are_known():
    d = policy().decide(Message("http"), 0.9)
    assert isinstance(d, Decision) and d.action in ACTIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.action = "reject"  # type: ignore[misc]


# --- bad [policy]: one line naming the key -----------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["policy.subject_score=0.9", "policy.quarantine_score=0.8"],
         "--set policy.quarantine_score: [policy] quarantine_score: 0.8 is below [policy] subject_score (0.9)"),
        (["policy.reject_score=0.9", "policy.milter.discard_score=0.95"],
         "[policy] reject_score: 0.9 is below [policy.milter] discard_score (0.95) for milter"),
        (["policy.tag_score=0.6", "policy.redis.subject_score=0.5"],
         "[policy.redis] subject_score: 0.5 is below [policy] tag_score (0.6) for redis"),
        (["policy.smtp.soft_reject_score=0.3"], "[policy.smtp] soft_reject_score: the after-queue SMTP filter cannot defer"),
        (["policy.redis.reject_score=0.99"], "[policy.redis] reject_score: redis cannot refuse a message"),
        (["policy.redis.soft_reject_score=0.3"], "[policy.redis] soft_reject_score: redis cannot defer a message"),
        (["policy.tag_score=off"], '[policy] tag_score: the spam threshold cannot be "off"'),
        (["policy.http.tag_score=off"], '[policy.http] tag_score: the spam threshold cannot be "off"'),
        (["policy.reject_score=1.5"], '[policy] reject_score: must be a number in 0..1, "model", "off" or "fpr:<share>" (the threshold the model measured for that ham FPR), got 1.5'),
        (["policy.reject_score=inherit"], '[policy] reject_score: must be a number in 0..1, "model", "off" or "fpr:<share>" (the threshold the model measured for that ham FPR), got "inherit"'),
        (["policy.smtp.reject_score=maybe"], '[policy.smtp] reject_score: must be a number in 0..1, "model", "off", "inherit" or "fpr:<share>" (the threshold the model measured for that ham FPR)'),
        (['policy.allow_senders="a@b.c"'], "[policy] allow_senders: must be an array of addresses or domains"),
        (['policy.deny_senders=["a b@c.d"]'], "[policy] deny_senders: not an address or domain: 'a b@c.d'"),
        (['policy.deny_recipients=["user@"]'], "[policy] deny_recipients: not an address or domain"),
        (["model.threshold=0.7", "policy.tag_score=0.6"], "[model] threshold: deprecated, and [policy] tag_score is set too"),
        (['smtp.action="subject"', "policy.smtp.subject_score=0.9"], "[smtp] action: deprecated, and [policy.smtp] subject_score is set too"),
        (["policy.quarantine_score=0.9"], "[smtp] quarantine_rcpt: required when a quarantine_score applies to the smtp door"),
    ],
)  # fmt: skip
def test_bad_policy_is_a_one_line_error_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as e:
        check_config(None, ["redis.enabled=false", *sets])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_policy_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "filterd.toml"
    f.write_text("[policy]\ntag_score = 0.5\nsubject_score = 0.4\n[redis]\nenabled = false\n")
    with pytest.raises(ConfigError, match=rf"^{f}: \[policy\] subject_score: 0.4 is below \[policy\] tag_score \(0.5\)"):
        check_config(f)
    f.write_text('[policy]\ntag_score = 0.5\nreject_score = 0.99\nallow_senders = ["a@b.example"]\n'
                 'allow_senders_require = "authenticated"\n[policy.smtp]\n'
                 'discard_score = 0.99\n[redis]\nenabled = false\n')  # fmt: skip
    c = check_config(f)
    assert c.warnings() == []  # [policy] reject_score is not the after-queue door's: no backscatter warning
    assert check_config(f, ["policy.smtp.reject_score=0.995"]).warnings()[-1].startswith("[policy.smtp] reject_score suits")


# --- lists: one form for entries and addresses (IDN, malformed) ------------------------


@pytest.mark.parametrize(
    "entry, sender",
    [
        ("xn--bcher-kva.example", "user@bücher.example"),  # an A-label entry, a U-label address (SMTPUTF8)
        ("bücher.example", "user@xn--bcher-kva.example"),  # and back
        ("Bücher.Example", "user@BÜCHER.example"),  # case folded in U-labels too
        ("XN--BCHER-KVA.example", "user@mail.bücher.example"),  # subdomains of an IDN
        ("Boss@Bücher.Example", "boss@xn--bcher-kva.example"),  # an address entry: its domain normalised, the local part as is
        ("faß.example", "x@xn--fa-hia.example"),  # IDNA 2008: ß is its own letter (IDNA 2003 would make it fass.example)
    ],
)
def test_idn_entries_and_addresses_match_in_one_form(entry, sender):
    p = policy(f"policy.allow_senders=[{_toml(entry)}]")
    d = p.listed(Message("milter", sender, ("a@ours.example",)))
    assert d is not None and d.listed == "allow_senders"
    assert d.reasons[0].isascii()  # A-labels in the reason (log lines, replies)


def test_an_idn_entry_does_not_match_its_ascii_lookalike():
    p = policy('policy.deny_senders=["xn--fa-hia.example"]')  # faß.example
    assert p.listed(Message("milter", "x@fass.example")) is None
    assert p.listed(Message("milter", "x@faß.example")) is not None


@pytest.mark.parametrize(
    "entry",
    [
        "x@.partner.example",  # an empty label: matched partner.example before
        ".partner.example",
        "partner..example",
        "partner.example..",
        "mail.-partner.example",  # a label starts with a hyphen
        "partner-.example",
        "under_score.example",  # not a host name
        "xn--zz.example",  # not a valid A-label
        "a" * 64 + ".example",  # a label over 63 octets
        ("a" * 63 + ".") * 4 + "example",  # a name over 253 octets
        "user@[192.0.2.1]",  # an address literal: use trusted_networks for addresses
        "part ner.example",
        "user @partner.example",
        "user@@partner.example",
        "@",
        "",
    ],
)
def test_a_malformed_entry_is_a_config_error_naming_key_and_entry(entry):
    with pytest.raises(ConfigError) as e:
        check_config(None, ["redis.enabled=false", f"policy.allow_senders=[{_toml(entry)}]"])
    message = str(e.value)
    assert message.startswith("--set policy.allow_senders: [policy] allow_senders: not an address or domain:")
    assert repr(entry) in message and "\n" not in message


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize(
    "sender",
    [
        "x@.partner.example",  # matched partner.example before
        "x@mail..partner.example",
        "x@mail.-x.partner.example",
        "@partner.example",  # no local part
        "x y@partner.example",
        "x@partner.example\r\nBcc: y@partner.example",
        "x@xn--zz.partner.example",  # not a valid A-label
        "x@partner.example..",
    ],
)
def test_a_malformed_address_from_the_wire_matches_nothing(sender):
    p = policy('policy.allow_senders=["partner.example"]', 'policy.deny_recipients=["partner.example"]')
    assert p.listed(Message("milter", sender, ("a@ours.example",))) is None
    assert p.listed(Message("milter", "a@b.example", (sender,))) is None  # recipients too
    assert p.listed(Message("milter", "x@mail.partner.example.")) is not None  # the root's dot is harmless


def test_normalize_entry_forms():
    from filterd.policy.decision import normalize_entry

    assert normalize_entry(" @Bücher.Example. ") == "xn--bcher-kva.example"
    assert normalize_entry("Boss@Bücher.Example") == "boss@xn--bcher-kva.example"
    assert normalize_entry("Jörg@example.com") == "jörg@example.com"  # local part: case only, no IDNA
    with pytest.raises(ValueError, match=r"not an address or domain: 'x@\.partner\.example'"):
        normalize_entry("x@.partner.example")


# --- lists: allow_senders only for authenticated or trusted clients ---------------------


REQUIRE = ['policy.allow_senders=["boss@example.com", "partner.example"]', 'policy.allow_recipients=["postmaster@ours.example"]',
           'policy.deny_recipients=["trap@ours.example"]', 'policy.trusted_networks=["127.0.0.0/8", "::1/128", "192.0.2.0/24"]',
           "policy.tag_score=0.5"]  # fmt: skip


def msg(sender: str = "boss@example.com", client: str = "", auth: str = "", rcpts: tuple[str, ...] = ("a@ours.example",)):
    return Message("milter", sender, rcpts, client_address=client, authenticated=auth)


@pytest.mark.parametrize(
    "require, client, auth, allowed",
    [
        ("none", "203.0.113.9", "", True),  # as before: anyone may claim the sender
        ("authenticated", "203.0.113.9", "boss", True),
        ("authenticated", "127.0.0.1", "", False),
        ("trusted_networks", "127.0.0.1", "", True),
        ("trusted_networks", "192.0.2.200", "", True),
        ("trusted_networks", "::1", "", True),
        ("trusted_networks", "::ffff:127.0.0.1", "", True),  # an IPv4 client on a dual-stack socket
        ("trusted_networks", "IPv6:::1", "", True),  # Postfix's XFORWARD form
        ("trusted_networks", "[192.0.2.1]", "", True),
        ("trusted_networks", "203.0.113.9", "boss", False),
        ("trusted_networks", "", "", False),  # unknown client
        ("trusted_networks", "localhost", "", False),  # a name is not an address
        ("authenticated_or_trusted_networks", "203.0.113.9", "boss", True),
        ("authenticated_or_trusted_networks", "192.0.2.7", "", True),
        ("authenticated_or_trusted_networks", "203.0.113.9", "", False),
    ],
)
def test_allow_senders_require(require, client, auth, allowed):
    p = policy(*REQUIRE, f'policy.allow_senders_require="{require}"')
    m = msg(client=client, auth=auth)
    d = p.listed(m)
    if allowed:
        assert d is not None and (d.verdict, d.action, d.listed) == ("ham", "pass", "allow_senders")
        assert d.reasons[:2] == ("sender boss@example.com is on allow_senders (boss@example.com)", "not scored")
        return
    assert d is None
    scored = p.decide(m, 0.9)
    assert (scored.verdict, scored.action, scored.score, scored.listed) == ("spam", "tag", 0.9, "")  # scored normally
    assert scored.reasons[0].startswith("score 0.9000")
    notes = [r for r in scored.reasons if "allow_senders" in r]
    assert len(notes) == 1 and notes[0].startswith("sender boss@example.com is on allow_senders (boss@example.com) but ")


def test_the_unmet_requirement_says_why_once_whatever_decides():
    p = policy(*REQUIRE, 'policy.allow_senders_require="authenticated_or_trusted_networks"')
    why = "sender x@partner.example is on allow_senders (partner.example) but neither authenticated nor from trusted_networks"
    cases = {
        "scored": msg("x@partner.example", "203.0.113.9"),
        "allow_recipients": msg("x@partner.example", "203.0.113.9", rcpts=("postmaster@ours.example",)),
        "deny_recipients": msg("x@partner.example", "203.0.113.9", rcpts=("trap@ours.example",)),
    }
    for listed, m in cases.items():
        d = p.decide(m, 0.1)
        assert d.listed == ("" if listed == "scored" else listed)
        assert d.reasons.count(why) == 1, d.reasons
    only_auth = policy(*REQUIRE, 'policy.allow_senders_require="authenticated"').decide(msg(client="127.0.0.1"), 0.1)
    assert only_auth.reasons[-1] == "sender boss@example.com is on allow_senders (boss@example.com) but not authenticated"
    only_net = policy(*REQUIRE, 'policy.allow_senders_require="trusted_networks"').decide(msg(client="203.0.113.9"), 0.1)
    assert only_net.reasons[-1] == (
        "sender boss@example.com is on allow_senders (boss@example.com) but client 203.0.113.9 is not in trusted_networks"
    )
    junk = policy(*REQUIRE, 'policy.allow_senders_require="trusted_networks"').decide(msg(client="x\r\ny"), 0.1)
    assert junk.reasons[-1].endswith("but the client address is unknown, not in trusted_networks")  # no wire junk in logs
    plain = p.decide(msg("other@elsewhere.example", "203.0.113.9"), 0.1)
    assert plain.reasons == ("score 0.1000 < 0.5000 (tag_score)",)  # nothing to say about senders not on the list


def test_trusted_networks_empty_trusts_nobody_and_allow_recipients_is_unrestricted():
    p = policy('policy.allow_senders=["partner.example"]', 'policy.allow_recipients=["postmaster@ours.example"]',
               'policy.allow_senders_require="trusted_networks"')  # fmt: skip
    assert p.listed(msg("x@partner.example", "127.0.0.1")) is None
    d = p.listed(msg("x@elsewhere.example", "203.0.113.9", rcpts=("postmaster@ours.example",)))
    assert d is not None and d.listed == "allow_recipients"  # recipients are not claimed by the client


def test_messages_carry_the_client_facts_with_defaults():
    m = Message("smtp", "a@b.example")
    assert (m.client_address, m.authenticated) == ("", "")
    assert policy(*REQUIRE, 'policy.allow_senders_require="authenticated"').listed(m) is None


@pytest.mark.parametrize(
    "sets, message",
    [
        (['policy.trusted_networks=["10.0.0.0/33"]'], "[policy] trusted_networks: not a network: '10.0.0.0/33'"),
        (['policy.trusted_networks=["10.0.0.1/8"]'], "[policy] trusted_networks: not a network: '10.0.0.1/8' (host bits set: 10.0.0.0/8?)"),
        (['policy.trusted_networks=["mx.example"]'], "[policy] trusted_networks: not a network: 'mx.example'"),
        (['policy.trusted_networks=[""]'], "[policy] trusted_networks: not a network: ''"),
        (['policy.trusted_networks="127.0.0.0/8"'], "[policy] trusted_networks: must be an array of networks"),
        (['policy.allow_senders_require="auth"'],
         "[policy] allow_senders_require: must be one of none, authenticated, trusted_networks, authenticated_or_trusted_networks"),
    ],
)  # fmt: skip
def test_bad_trusted_networks_and_require_are_one_line_errors(sets, message):
    with pytest.raises(ConfigError) as e:
        check_config(None, ["redis.enabled=false", *sets])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_config_warns_about_allow_senders_anyone_can_claim(tmp_path, capsys):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[policy]\nallow_senders = ["boss@example.com"]\n[redis]\nenabled = false\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert 'warning: [policy] allow_senders with allow_senders_require = "none": ' in err and "forge" in err
    cfg.write_text('[policy]\nallow_senders = ["boss@example.com"]\nallow_senders_require = "trusted_networks"\n'
                   "[redis]\nenabled = false\n")  # fmt: skip
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert 'warning: [policy] allow_senders_require = "trusted_networks" but trusted_networks is empty' in capsys.readouterr().err
    cfg.write_text('[policy]\nallow_senders = ["boss@example.com"]\nallow_senders_require = "authenticated_or_trusted_networks"\n'
                   'trusted_networks = ["::1/128"]\n[redis]\nenabled = false\n')  # fmt: skip
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert "allow_senders" not in capsys.readouterr().err
    assert check_config(None, ["redis.enabled=false"]).warnings() == []  # no allow_senders, nothing to say


# --- levels set as a ham FPR ("fpr:"), resolved from the model's operating points ---------


def test_fpr_levels_take_the_models_measured_thresholds():
    p = policy('policy.tag_score="fpr:0.01"', 'policy.milter.reject_score="fpr:0.001"')
    points = {0.01: 0.8, 0.005: 0.9, 0.001: 0.97}
    assert p.decide(Message("milter"), 0.79, 0.5, points).action == "pass"
    d = p.decide(Message("milter"), 0.85, 0.5, points)
    assert (d.verdict, d.action, d.threshold) == ("spam", "tag", 0.8)  # the threshold headers map to `required`
    assert p.decide(Message("milter"), 0.97, 0.5, points).action == "reject"
    assert p.decide(Message("http"), 0.99, 0.5, points).action == "tag"  # reject was set for the milter only
    assert p.targets() == {0.01, 0.001}


def test_a_model_without_the_point_a_level_needs_is_refused():
    from filterd.errors import ModelError

    p = policy('policy.tag_score="fpr:0.001"')
    p.check_model({0.001: 0.9}, "v1")
    with pytest.raises(ModelError, match=r"model v2 has no operating point for \[policy\] level\(s\) fpr:0.001 \(it has: 0.01\)"):
        p.check_model({0.01: 0.7}, "v2")
    with pytest.raises(ValueError, match="no operating point"):
        p.decide(Message("smtp"), 0.95, 0.5, {0.01: 0.7})  # never reached in the daemon: the model was refused
    policy("policy.tag_score=model").check_model({}, "v3")  # no "fpr:" level: any model serves


@pytest.mark.parametrize("value", ['"fpr:0"', '"fpr:1"', '"fpr:x"', '"fpr:"', '"fpr:-0.01"'])
def test_bad_fpr_levels_are_config_errors(value):
    with pytest.raises(ConfigError, match=r'tag_score: must be a number in 0\.\.1.*"fpr:<share>"'):
        check_config(None, ["redis.enabled=false", f"policy.tag_score={value}"])


def test_fpr_levels_are_written_one_way():
    cfg = check_config(None, ["redis.enabled=false", 'policy.tag_score="fpr:0.0050"'])
    assert cfg.policy.tag_score == "fpr:0.005"


def test_check_config_checks_fpr_levels_against_the_model_it_names(tmp_path, capsys):
    import json as json_
    from pathlib import Path

    from filterd.model.gpt2 import CONFIGS
    from filterd.model.weights import ModelMeta

    model = tmp_path / "model"
    model.mkdir()
    meta = ModelMeta(version="v1", base="random:tiny", base_kind="random", config=CONFIGS["tiny"], max_length=8,
                     operating_points=[{"ham_fpr_target": 0.01, "threshold": 0.8}, {"ham_fpr_target": 0.001, "threshold": None}])  # fmt: skip
    (model / "filterd.json").write_text(meta.to_json())
    def check(model_path: Path, level: str) -> int:
        cfg = tmp_path / "filterd.toml"
        cfg.write_text(f'[model]\npath = "{model_path}"\n[redis]\nenabled = false\n[policy]\ntag_score = "{level}"\n')
        return main(["check-config", "--config", str(cfg)])

    assert check(model, "fpr:0.01") == 0
    assert check(model, "fpr:0.001") == 1
    assert "model v1 has no operating point for [policy] level(s) fpr:0.001 (it has: 0.01)" in capsys.readouterr().err
    assert check(tmp_path / "none", "fpr:0.01") == 0
    assert "is not there to check them against" in capsys.readouterr().err
    assert json_.loads((model / "filterd.json").read_text())["operating_points"][0]["threshold"] == 0.8
