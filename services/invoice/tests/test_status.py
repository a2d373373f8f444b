import pytest

from services.invoice.status import ALLOWED, InvoiceStatus, can_transition

S = InvoiceStatus


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.DRAFT, S.SENT), (S.SENT, S.VIEWED), (S.VIEWED, S.PARTIAL), (S.PARTIAL, S.PAID),
        (S.SENT, S.OVERDUE), (S.OVERDUE, S.PARTIAL), (S.OVERDUE, S.PAID), (S.DRAFT, S.CANCELLED),
        (S.OVERDUE, S.CANCELLED),
    ],
)
def test_design_transitions_allowed(current: InvoiceStatus, target: InvoiceStatus) -> None:
    assert can_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [(S.PAID, S.PARTIAL), (S.CANCELLED, S.SENT), (S.VIEWED, S.SENT), (S.PARTIAL, S.CANCELLED), (S.DRAFT, S.PAID)],
)
def test_backward_or_illegal_transitions_refused(current: InvoiceStatus, target: InvoiceStatus) -> None:
    assert not can_transition(current, target)


def test_terminal_states() -> None:
    assert ALLOWED[S.PAID] == frozenset() and ALLOWED[S.CANCELLED] == frozenset()


@pytest.mark.parametrize(
    ("current", "target"),
    [(S.PAID, S.PARTIAL), (S.PAID, S.SENT), (S.PAID, S.VIEWED), (S.PAID, S.OVERDUE),
     (S.PARTIAL, S.SENT), (S.PARTIAL, S.VIEWED)],
)
def test_a_refund_names_its_backward_moves(current: InvoiceStatus, target: InvoiceStatus) -> None:
    assert can_transition(current, target, refund=True)
    assert not can_transition(current, target)  # no other cause moves an invoice back


@pytest.mark.parametrize(
    ("current", "target"),
    [(S.CANCELLED, S.SENT), (S.PAID, S.CANCELLED), (S.PARTIAL, S.CANCELLED), (S.DRAFT, S.PARTIAL),
     (S.OVERDUE, S.SENT), (S.PAID, S.DRAFT)],
)
def test_a_refund_opens_no_other_move(current: InvoiceStatus, target: InvoiceStatus) -> None:
    assert not can_transition(current, target, refund=True)
