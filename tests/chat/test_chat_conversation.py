"""The conversation tree: edit -> branch, regenerate -> sibling, navigation, delete, fork, round trip."""
from __future__ import annotations

import subprocess
import sys

import pytest

from chatapp.chat.conversation import DEFAULT_TITLE, Conversation, Message


def chat() -> tuple[Conversation, dict[str, Message]]:
    """u1 -> a1 -> u2 -> a2, built with fixed, increasing timestamps."""
    c = Conversation()
    m = {}
    m["u1"] = c.add(None, "user", "What is 2+2?", created_at=100.0)
    m["a1"] = c.add(m["u1"].id, "assistant", "4.", created_at=101.0, token_ids=[5, 6])
    m["u2"] = c.add(m["a1"].id, "user", "And 3+3?", created_at=102.0)
    m["a2"] = c.add(m["u2"].id, "assistant", "6.", created_at=103.0)
    return c, m


def contents(c: Conversation, leaf: str | None = None) -> list[str]:
    return [m.content for m in c.path(leaf)]


def test_chat_layer_never_imports_torch():
    code = ("import sys, chatapp.chat.conversation, chatapp.chat.store, chatapp.chat.session, "
            "chatapp.chat.export, chatapp.chat.fake; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_add_builds_a_path_and_names_the_chat():
    c, m = chat()
    assert contents(c) == ["What is 2+2?", "4.", "And 3+3?", "6."]
    assert c.current_leaf == m["a2"].id
    assert c.title == "What is 2+2?"
    assert c.children(m["u1"].id) == [m["a1"]]
    with pytest.raises(KeyError):
        c.add("nope", "user", "x")
    with pytest.raises(ValueError):
        c.add(None, "robot", "x")


def test_long_first_message_gives_a_short_title_and_renamed_chats_keep_theirs():
    c = Conversation()
    c.add(None, "user", "\n  " + "word " * 40)
    assert len(c.title) <= 60 and c.title.endswith("…")
    c2 = Conversation(title="Mine")
    c2.add(None, "user", "hello")
    assert c2.title == "Mine"
    assert Conversation().title == DEFAULT_TITLE


def test_edit_creates_a_sibling_branch_and_never_overwrites():
    c, m = chat()
    new = c.edit(m["u2"].id, "And 5+5?")
    assert new.id != m["u2"].id and new.parent_id == m["a1"].id
    assert c.get(m["u2"].id).content == "And 3+3?"
    assert contents(c) == ["What is 2+2?", "4.", "And 5+5?"]
    assert [s.id for s in c.siblings(new.id)] == [m["u2"].id, new.id]
    assert c.sibling_index(new.id) == (1, 2)
    # The old branch, with its reply, is still reachable.
    assert contents(c, m["a2"].id)[-1] == "6."


def test_editing_a_reply_drops_its_token_ids_and_records_the_origin():
    c, m = chat()
    new = c.edit(m["a1"].id, "Four.")
    assert new.role == "assistant" and new.token_ids is None
    assert new.run["edited_from"] == m["a1"].id
    assert c.get(m["a1"].id).token_ids == [5, 6]


def test_regenerate_is_a_new_sibling_under_the_same_parent():
    c, m = chat()
    again = c.add(m["u2"].id, "assistant", "Six.")
    assert c.siblings(m["a2"].id) == [m["a2"], again]
    assert c.sibling_index(m["a2"].id) == (0, 2)
    assert c.current_leaf == again.id


def test_switch_sibling_follows_the_most_recent_branch_and_clamps():
    c, m = chat()
    alt_u2 = c.edit(m["u2"].id, "And 5+5?")
    alt_a = c.add(alt_u2.id, "assistant", "10.")
    back = c.switch_sibling(alt_u2.id, -1)
    assert back.id == m["u2"].id
    # Landing on the old user message shows its reply too (deepest descendant).
    assert c.current_leaf == m["a2"].id
    assert c.switch_sibling(m["u2"].id, -1).id == m["u2"].id  # clamped at the first
    assert c.switch_sibling(m["u2"].id, +5).id == alt_u2.id    # clamped at the last
    assert c.current_leaf == alt_a.id
    # With two replies, the newest one is the branch shown.
    newer = c.add(alt_u2.id, "assistant", "Ten.")
    c.switch_sibling(m["u2"].id, 0)
    c.switch_sibling(m["u2"].id, 1)
    assert c.current_leaf == newer.id


def test_delete_removes_the_subtree_and_moves_the_view_sensibly():
    c, m = chat()
    alt = c.edit(m["u2"].id, "And 5+5?")
    alt_reply = c.add(alt.id, "assistant", "10.")
    gone = c.delete(alt.id)
    assert set(gone) == {alt.id, alt_reply.id}
    assert alt.id not in c.messages and alt_reply.id not in c.messages
    # The view moved to the remaining sibling branch.
    assert c.current_leaf == m["a2"].id
    # Deleting a message with no siblings moves the view to its parent.
    c.delete(m["a2"].id)
    assert c.current_leaf == m["u2"].id
    # Deleting something off-screen leaves the view alone.
    side = c.add(m["u1"].id, "assistant", "four", created_at=200.0)
    c.switch_sibling(side.id, -1)
    leaf = c.current_leaf
    c.delete(side.id)
    assert c.current_leaf == leaf
    # Deleting the root empties the chat.
    c.delete(m["u1"].id)
    assert c.messages == {} and c.current_leaf is None and c.path() == []


def test_fork_copies_one_branch_under_new_ids():
    c, m = chat()
    c.system_prompt, c.settings, c.controls = "Be terse.", {"temperature": 0.1}, {"num_steps": 8}
    c.add(m["u2"].id, "assistant", "Six.")
    f = c.fork(m["a2"].id)
    assert f.id != c.id and f.title.endswith("(fork)")
    assert contents(f) == ["What is 2+2?", "4.", "And 3+3?", "6."]
    assert not set(f.messages) & set(c.messages)
    assert len(f.messages) == 4  # the other reply is not copied
    assert (f.system_prompt, f.settings, f.controls) == ("Be terse.", {"temperature": 0.1}, {"num_steps": 8})
    assert f.path()[1].token_ids == [5, 6]
    f.settings["temperature"] = 0.9
    assert c.settings["temperature"] == 0.1


def test_dict_round_trip_keeps_the_whole_tree():
    c, m = chat()
    c.edit(m["u2"].id, "alt")
    c.switch_sibling(m["u2"].id, 0)
    d = c.to_dict()
    back = Conversation.from_dict(d)
    assert back.to_dict() == d
    assert back.current_leaf == c.current_leaf


def test_clone_renames_every_id_and_keeps_the_shape():
    c, m = chat()
    c.edit(m["a1"].id, "four")
    k = c.clone()
    assert not set(k.messages) & set(c.messages) and k.id != c.id
    assert contents(k) == contents(c)
    assert sorted(len(k.children(x.id)) for x in k.messages.values()) == sorted(
        len(c.children(x.id)) for x in c.messages.values())


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["messages"][1].update(parent_id="ghost"), "not in the chat"),
    (lambda d: d["messages"][0].update(role="robot"), "role"),
    (lambda d: d["messages"][0].update(parent_id=d["messages"][3]["id"]), "cycle"),
    (lambda d: d.update(current_leaf="ghost"), "current_leaf"),
    (lambda d: d["messages"].append(dict(d["messages"][0])), "twice"),
    (lambda d: d["messages"][1].update(token_ids=["a"]), "token_ids"),
    (lambda d: d["messages"][1].update(status="done"), "status"),
])
def test_from_dict_rejects_broken_trees(breakage, message):
    c, _ = chat()
    d = c.to_dict()
    breakage(d)
    with pytest.raises(ValueError, match=message):
        Conversation.from_dict(d)


def test_same_tick_messages_keep_their_creation_order():
    c = Conversation()
    u = c.add(None, "user", "hi", created_at=5.0)
    replies = [c.add(u.id, "assistant", str(i), created_at=5.0) for i in range(5)]
    assert [r.content for r in c.children(u.id)] == ["0", "1", "2", "3", "4"]
    assert len({r.created_at for r in replies}) == 5


def test_can_continue_only_cut_off_replies():
    c, m = chat()
    a = m["a2"]
    a.run["stop_reason"] = "eos"
    assert not a.can_continue
    a.run["stop_reason"] = "max_tokens"
    assert a.can_continue
    a.status = "error"
    assert not a.can_continue
    assert not m["u2"].can_continue


def test_repair_mode_fixes_what_it_can_and_says_what_it_did():
    c, m = chat()
    d = c.to_dict()
    by = {x["id"]: x for x in d["messages"]}
    by[m["u1"].id]["parent_id"] = m["a1"].id  # u1 <-> a1: a cycle with the rest of the chat under it
    by[m["a2"].id]["run"] = {"timings": {"decode_tok_s": "fast"}, "seed": 7}
    by[m["a2"].id]["status"] = "finished"
    d["messages"].append(dict(by[m["u2"].id], content="a duplicate"))
    d["messages"].append({"id": "x", "role": "user", "content": 5, "created_at": 104.0, "parent_id": m["a2"].id})
    d["messages"].append({"id": "y", "role": "assistant", "content": "under x", "created_at": 105.0, "parent_id": "x"})
    d["current_leaf"] = "nowhere"
    with pytest.raises(ValueError):
        Conversation.from_dict(d)
    k = Conversation.from_dict(d, repair=True)
    text = "\n".join(k.repairs)
    for why in ("cycle", "decode_tok_s", "finished", "appears twice", "content must be a string", "current_leaf"):
        assert why in text, why
    assert k.roots() and [x.content for x in k.path(k.get("y").id)][-3:] == ["And 3+3?", "6.", "under x"]
    assert k.get(m["a2"].id).run == {"seed": 7} and k.get(m["a2"].id).status == "stopped"
    assert k.get(m["u2"].id).content == "And 3+3?"  # the first of two copies is kept
    assert Conversation.from_dict(k.to_dict()).to_dict() == k.to_dict()  # what repair returns is valid


def test_a_long_chain_is_validated_in_linear_time():
    n = 20_000
    msgs = [{"id": f"m{i}", "parent_id": f"m{i - 1}" if i else None, "role": "user" if i % 2 == 0 else "assistant",
             "content": str(i), "created_at": float(i + 1)} for i in range(n)]
    import time
    t = time.perf_counter()
    back = Conversation.from_dict({"id": "long", "messages": msgs})  # no current_leaf: the latest is found
    assert time.perf_counter() - t < 5.0  # checking each path, or each level's children, took minutes here
    assert back.current_leaf == f"m{n - 1}" and len(back.path()) == n
