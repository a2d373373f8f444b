import {
  ApiError, OPEN_STATUSES, api, el, formatDate, formatDateTime, formatMoney, formatPercent, formatQuantity, hide,
  requireLogin, setupHeader, show, statusBadge, uuid4,
} from "./portal.js";

const $ = (id) => document.getElementById(id);

const invoiceId = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop() || "");
const params = new URLSearchParams(location.search);
const checkoutResult = params.get("checkout");
const checkoutSessionId = params.get("session_id");

const POLL_FAST_MS = 1000;
const POLL_SLOW_MS = 5000;
const FAST_POLLS = 60; // one a second for a minute, then every 5 s
const MAX_POLL_MS = 10 * 60 * 1000; // then give up and say so
const SETTLE_POLLS = 60; // after "paid": wait this many polls for the invoice to show the payment

const METHOD_LABELS = {
  card: "Card", stripe: "Card", bank_transfer: "Bank transfer", cash: "Cash", cheque: "Cheque", other: "Other",
  sepa_debit: "SEPA Direct Debit", us_bank_account: "Bank account", link: "Link",
};

let invoice = null;
let checkoutBusy = false; // a checkout session is being created (the browser is about to leave)
let confirming = false; // back from the checkout: waiting for the payment's confirmation
let payKey = null; // Idempotency-Key of this page's Pay now (one checkout per click-session)

const checkoutBox = $("checkout-status");
const actionError = $("action-error");
const payNow = $("pay-now");

function setCheckoutStatus(kind, message) {
  checkoutBox.className = `alert alert-${kind}`;
  checkoutBox.dataset.state = kind;
  show(checkoutBox, message);
}

// -- rendering -------------------------------------------------------------------------------------

function render(inv) {
  invoice = inv;
  const cur = inv.currency;
  document.title = `Invoice ${inv.invoiceNumber || "draft"} · Client portal`;
  $("invoice-number").textContent = inv.invoiceNumber ? `Invoice ${inv.invoiceNumber}` : "Draft invoice";
  statusBadge($("invoice-status"), inv.status);
  $("issue-date").textContent = formatDate(inv.issueDate);
  $("due-date").textContent = formatDate(inv.dueDate);
  const paidAt = $("paid-at");
  paidAt.textContent = formatDateTime(inv.paidAt);
  paidAt.hidden = $("paid-at-label").hidden = !inv.paidAt;

  $("item-rows").replaceChildren(...(inv.items || []).map((item) => el("tr", { attrs: { "data-testid": "line-item" } }, [
    el("td", { text: item.description }),
    el("td", { text: formatQuantity(item.quantity), className: "num" }),
    el("td", { text: formatMoney(item.unitPrice, cur), className: "num" }),
    el("td", {
      text: item.discountPercent ? formatPercent(item.discountPercent)
        : item.discount ? formatMoney(item.discount, cur) : "—",
      className: "num",
    }),
    el("td", { text: formatPercent(item.taxRate ?? inv.taxRate), className: "num" }),
    el("td", { text: formatMoney(item.amount, cur), className: "num" }),
  ])));

  $("subtotal").textContent = formatMoney(inv.subtotal, cur);
  $("discount-row").hidden = !inv.discountAmount;
  $("discount").textContent = `−${formatMoney(inv.discountAmount, cur)}`;
  $("tax").textContent = formatMoney(inv.taxAmount, cur);
  $("total").textContent = formatMoney(inv.total, cur);
  $("amount-paid").textContent = formatMoney(inv.amountPaid, cur);
  $("amount-due-row").textContent = formatMoney(inv.amountDue, cur);
  $("amount-due").textContent = formatMoney(inv.amountDue, cur);

  $("notes-section").hidden = !inv.notes;
  $("notes").textContent = inv.notes || "";

  updatePayButton();
  hide($("loading"));
  show($("invoice"));
}

function payable(inv) {
  return inv !== null && OPEN_STATUSES.has(inv.status) && inv.amountDue > 0;
}

function updatePayButton() {
  // Hidden while a returned checkout is being confirmed: paying again then could pay twice.
  payNow.hidden = !payable(invoice) || confirming;
  payNow.disabled = checkoutBusy;
  if (!checkoutBusy) payNow.textContent = "Pay now";
}

function renderHistory(entries) {
  const rows = entries.map((p) => el("tr", { attrs: { "data-testid": "payment-row", "data-payment-id": p.paymentId } }, [
    el("td", { text: formatDateTime(p.paidAt) }),
    el("td", { text: p.kind === "refund" ? "Refund" : "Payment" }),
    el("td", { text: METHOD_LABELS[p.method] || p.method }),
    el("td", { text: p.reference || "—" }),
    el("td", { text: formatMoney(p.amount, p.currency), className: "num" }),
  ]));
  $("history-rows").replaceChildren(...rows);
  $("history-table").hidden = rows.length === 0;
  $("history-empty").hidden = rows.length !== 0;
  hide($("history-error"));
}

// -- loading ---------------------------------------------------------------------------------------

async function loadInvoice() {
  render(await api(`/api/invoices/${encodeURIComponent(invoiceId)}`));
  return invoice;
}

async function loadHistory() {
  try {
    // The ledger is a cursor page: the history shows its first 100 entries (the largest page).
    const entries = (await api(`/api/invoices/${encodeURIComponent(invoiceId)}/payments?limit=100`)).items;
    renderHistory(entries);
    return entries;
  } catch (err) {
    show($("history-error"), `Payment history is unavailable: ${err.message}`);
    return null;
  }
}

// -- PDF download ----------------------------------------------------------------------------------

function filenameFrom(disposition) {
  if (!disposition) return null;
  let name = null;
  const star = /filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)/.exec(disposition);
  if (star) {
    try { name = decodeURIComponent(star[1].trim()); } catch (_) { name = null; }
  }
  if (!name) {
    const plain = /filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))/.exec(disposition);
    if (plain) name = (plain[1] ?? plain[2]).replace(/\\(.)/g, "$1");
  }
  if (!name) return null;
  name = name.replace(/[\\/\u0000-\u001f\u007f]/g, "_").trim();
  return name || null;
}

async function downloadPdf() {
  const button = $("download-pdf");
  hide(actionError);
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Preparing PDF…";
  try {
    const response = await api(`/api/invoices/${encodeURIComponent(invoiceId)}/pdf`, {
      raw: true, headers: { Accept: "application/pdf" },
    });
    const blob = await response.blob();
    const fallback = `invoice-${invoice && invoice.invoiceNumber ? invoice.invoiceNumber : invoiceId}.pdf`;
    const name = filenameFrom(response.headers.get("Content-Disposition")) || fallback;
    const href = URL.createObjectURL(blob);
    const link = el("a", { attrs: { href, download: name }, className: "visually-hidden" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
  } catch (err) {
    show(actionError, `The PDF could not be downloaded: ${err.message}`);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// -- Pay now ---------------------------------------------------------------------------------------

function checkoutUrl(value) {
  const url = new URL(value, location.origin);
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new Error("unexpected checkout address");
  return url.href;
}

async function startCheckout() {
  if (checkoutBusy || confirming || !payable(invoice)) return; // a double click: the first is on its way
  checkoutBusy = true;
  hide(actionError);
  payNow.disabled = true;
  payNow.textContent = "Opening checkout…";
  payKey = payKey || uuid4();
  try {
    let result = null;
    for (let attempt = 0; result === null; attempt += 1) {
      try {
        result = await api(`/api/invoices/${encodeURIComponent(invoiceId)}/checkout`, {
          method: "POST", headers: { "Idempotency-Key": payKey },
        });
      } catch (err) {
        // The same key is still being served (a second tab or a retry): wait for its answer.
        if (!(err instanceof ApiError && err.code === "idempotency_in_progress" && attempt < 10)) throw err;
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
    }
    location.assign(checkoutUrl(result.url));
    // stay "busy": the browser is leaving for the checkout page
  } catch (err) {
    checkoutBusy = false;
    payKey = null; // the stored answer was an error: the next click is a new attempt
    show(actionError, err.message || "The checkout could not be opened.");
    if (err instanceof ApiError && err.status === 409) {
      loadInvoice().catch(() => {}); // e.g. already paid, or cancelled meanwhile
    }
    updatePayButton();
  }
}

// -- back from the checkout ------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function settleAfterPayment(paymentId) {
  // The payment is confirmed; the invoice learns of it through an event. Show it once it has.
  for (let i = 0; i < SETTLE_POLLS; i += 1) {
    const [inv, history] = await Promise.all([loadInvoice().catch(() => invoice), loadHistory()]);
    const applied = history && history.some((p) => String(p.paymentId) === String(paymentId));
    if (inv && inv.status === "PAID") return true;
    if (applied) {
      // The two reads ran at once: the invoice may have been read just before the payment was applied
      // (both commit together in the invoice service), so read it again now that the ledger has it.
      await loadInvoice().catch(() => {});
      return true;
    }
    await sleep(POLL_FAST_MS);
  }
  return false;
}

async function followCheckout(sessionId) {
  // "processing" until the payments service has the webhook's word; the redirect alone proves nothing.
  confirming = true;
  updatePayButton();
  const started = Date.now();
  for (let polls = 0; ; polls += 1) {
    let status = null;
    try {
      status = await api(`/api/payments/checkout-sessions/${encodeURIComponent(sessionId)}`);
    } catch (err) {
      if (err instanceof ApiError && (err.status === 404 || err.status === 422)) {
        confirming = false;
        setCheckoutStatus("error", "We could not find this payment. If you paid, it will show up here shortly.");
        updatePayButton();
        return;
      }
      // a hiccup: keep polling
    }
    if (status && status.invoiceId !== invoiceId) {
      confirming = false;
      setCheckoutStatus("error", "This payment belongs to another invoice.");
      updatePayButton();
      return;
    }
    const state = status ? status.paymentStatus : "processing";
    if (state === "paid") {
      setCheckoutStatus("success", "Payment received. Updating the invoice…");
      const settled = await settleAfterPayment(status.paymentId);
      confirming = false;
      setCheckoutStatus("success", settled ? "Payment received. Thank you!"
        : "Payment received. The invoice will show it shortly.");
      updatePayButton();
      return;
    }
    if (state === "failed" || state === "expired") {
      confirming = false;
      setCheckoutStatus("error", state === "failed"
        ? "The payment failed and no money was taken. You can try again, or pay another way."
        : "This checkout expired before it was paid. No money was taken; you can start a new payment.");
      await Promise.all([loadInvoice().catch(() => {}), loadHistory()]);
      updatePayButton();
      return;
    }
    if (Date.now() - started > MAX_POLL_MS) {
      confirming = false;
      setCheckoutStatus("info", "Your payment is still being processed; some payment methods take a while. Check back later.");
      updatePayButton();
      return;
    }
    setCheckoutStatus("info", "Payment processing… This page updates by itself once the payment is confirmed.");
    if (polls > 0) loadInvoice().catch(() => {}); // keep status and amounts fresh meanwhile
    await sleep(polls < FAST_POLLS ? POLL_FAST_MS : POLL_SLOW_MS);
  }
}

// -- start -----------------------------------------------------------------------------------------

async function main() {
  setupHeader();
  payNow.addEventListener("click", startCheckout);
  $("download-pdf").addEventListener("click", downloadPdf);
  // Back from the checkout page through the browser's back button (page restored from cache).
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && !checkoutResult) {
      checkoutBusy = false;
      payKey = null;
      updatePayButton();
    }
  });
  try {
    await loadInvoice();
  } catch (err) {
    hide($("loading"));
    show($("page-error"), err instanceof ApiError && (err.status === 404 || err.status === 422)
      ? "Invoice not found." : err.message);
    return;
  }
  loadHistory();
  if (checkoutResult === "success" && checkoutSessionId) {
    followCheckout(checkoutSessionId);
  } else if (checkoutResult === "cancelled" || checkoutResult === "cancel") {
    setCheckoutStatus("warning", "Payment cancelled. No money was taken.");
  }
}

if (requireLogin()) main();
