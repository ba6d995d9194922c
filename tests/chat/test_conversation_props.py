"""Property test: the conversation tree under random edits, branches, deletes, regenerations and
continuations behaves like a plain reference model (a parent map plus creation order)."""
from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatapp.chat.conversation import Conversation
from props import PROPS

TEXT = st.text(max_size=20)


class Model:
    """What the tree must be: parent, role and text of each message, in creation order, and the leaf."""

    def __init__(self) -> None:
        self.parent: dict[str, str | None] = {}
        self.role: dict[str, str] = {}
        self.text: dict[str, str] = {}
        self.order: list[str] = []
        self.leaf: str | None = None

    def add(self, mid: str, parent: str | None, role: str, text: str) -> None:
        self.parent[mid], self.role[mid], self.text[mid] = parent, role, text
        self.order.append(mid)
        self.leaf = mid

    def kids(self, mid: str | None) -> list[str]:
        return [m for m in self.order if self.parent[m] == mid]

    def newest_leaf(self, mid: str) -> str:
        while self.kids(mid):
            mid = self.kids(mid)[-1]
        return mid

    def path(self) -> list[str]:
        out, node = [], self.leaf
        while node is not None:
            out.append(node)
            node = self.parent[node]
        return out[::-1]

    def delete(self, mid: str) -> None:
        gone, todo = set(), [mid]
        while todo:
            x = todo.pop()
            gone.add(x)
            todo += self.kids(x)
        sibs = self.kids(self.parent[mid])
        at = sibs.index(mid)
        rest = [s for s in sibs if s != mid]
        parent = self.parent[mid]
        self.order = [m for m in self.order if m not in gone]
        for x in gone:
            del self.parent[x], self.role[x], self.text[x]
        if self.leaf in gone:
            self.leaf = self.newest_leaf(rest[max(at - 1, 0)]) if rest else parent


class Tree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conv = Conversation()
        self.model = Model()

    def _pick(self, data, role: str | None = None) -> str:
        ids = [m for m in self.model.order if role is None or self.model.role[m] == role]
        return data.draw(st.sampled_from(ids))

    @rule(text=TEXT)
    def send(self, text):
        """A user message under the branch on screen, and the reply to it."""
        u = self.conv.add(self.conv.current_leaf, "user", text)
        self.model.add(u.id, self.model.leaf, "user", text)
        a = self.conv.add(u.id, "assistant", text[::-1])
        self.model.add(a.id, u.id, "assistant", text[::-1])

    @precondition(lambda self: self.model.order)
    @rule(data=st.data(), text=TEXT)
    def edit(self, data, text):
        mid = self._pick(data)
        m = self.conv.edit(mid, text)
        self.model.add(m.id, self.model.parent[mid], self.model.role[mid], text)

    @precondition(lambda self: "assistant" in self.model.role.values())
    @rule(data=st.data())
    def regenerate(self, data):
        mid = self._pick(data, "assistant")
        m = self.conv.add(self.conv.get(mid).parent_id, "assistant", "again")
        self.model.add(m.id, self.model.parent[mid], "assistant", "again")

    @precondition(lambda self: self.model.leaf is not None)
    @rule(text=TEXT)
    def continue_reply(self, text):
        """Continuing the reply at the end of the branch appends to it in place."""
        leaf = self.conv.get(self.conv.current_leaf)
        leaf.content += text
        self.model.text[leaf.id] += text

    @precondition(lambda self: self.model.order)
    @rule(data=st.data())
    def delete(self, data):
        mid = self._pick(data)
        gone = self.conv.delete(mid)
        before = set(self.model.order)
        self.model.delete(mid)
        assert set(gone) == before - set(self.model.order)

    @precondition(lambda self: self.model.order)
    @rule(data=st.data(), delta=st.integers(-3, 3))
    def switch(self, data, delta):
        mid = self._pick(data)
        chosen = self.conv.switch_sibling(mid, delta)
        sibs = self.model.kids(self.model.parent[mid])
        want = sibs[min(max(sibs.index(mid) + delta, 0), len(sibs) - 1)]
        assert chosen.id == want
        self.model.leaf = self.model.newest_leaf(want)

    @invariant()
    def same_tree(self):
        c, m = self.conv, self.model
        assert list(c.messages) == m.order
        assert {k: v.parent_id for k, v in c.messages.items()} == m.parent
        assert {k: v.content for k, v in c.messages.items()} == m.text
        assert c.current_leaf == m.leaf and [x.id for x in c.path()] == m.path()
        for mid in [None, *m.order]:
            assert [x.id for x in c.children(mid)] == m.kids(mid)

    @invariant()
    def survives_a_round_trip(self):
        d = self.conv.to_dict()
        assert Conversation.from_dict(d).to_dict() == d


Tree.TestCase.settings = PROPS
test_conversation_tree_matches_the_reference_model = Tree.TestCase
