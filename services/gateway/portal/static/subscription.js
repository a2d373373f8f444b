// The client's subscription: plan, status, next billing, trial, pending change; change plan with the
// preview shown before confirming; cancel at period end and resume; Stripe's billing portal; and, with
// no subscription, the plans to subscribe to through Stripe's Checkout. Every figure comes from the API
// (the subscriptions service mirrors Stripe): the page never decides what was paid or granted.
import {
  ApiError, api, el, formatDay, formatMoney, hide, requireLogin, setupHeader, show, uuid4,
} from "./portal.js";

const $ = (id) => document.getElementById(id);

const params = new URLSearchParams(location.search);
const checkoutResult = params.get("checkout");

const POLL_FAST_MS = 1000;
const POLL_SLOW_MS = 5000;
const FAST_POLLS = 60; // one a second for a minute, then every 5 s
const MAX_POLL_MS = 10 * 60 * 1000; // then give up and say so
const MAX_PAGES = 10; // of 100 items each: more plans than a portal could show

// Stripe's statuses (contracts/subscription.py).
const STATUS_LABELS = {
  trialing: "Trial", active: "Active", past_due: "Past due", canceled: "Canceled", unpaid: "Unpaid",
  incomplete: "Incomplete", incomplete_expired: "Expired", paused: "Paused",
};
const ENDED = new Set(["canceled", "incomplete_expired"]);
const CHANGEABLE = new Set(["trialing", "active", "past_due"]);
const CANCELLABLE = new Set(["trialing", "active", "past_due", "unpaid"]);
const KIND_LABELS = { upgrade: "Upgrade", downgrade: "Downgrade", interval: "Change of billing interval" };

let me = null; // the signed-in user (/api/auth/me)
let clientCurrency = null; // the client's currency: the plans offered are priced in it
let plans = []; // active plans with their active prices
const prices = new Map(); // price id -> { price, plan }
let subscriptions = [];
let confirming = false; // back from Checkout: waiting for Stripe's webhook to reach the mirror
let leaving = false; // on the way to Checkout or the billing portal

const checkoutBox = $("checkout-status");
const pageError = $("page-error");

// -- helpers -----------------------------------------------------------------------------------

function setStatus(kind, message) {
  checkoutBox.className = `alert alert-${kind}`;
  checkoutBox.dataset.state = kind;
  show(checkoutBox, message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function upper(value) {
  return String(value || "").toUpperCase();
}

// "month" / "3 months" / "year".
function every(interval, count) {
  if (!interval) return "";
  return !count || count === 1 ? interval : `${count} ${interval}s`;
}

function priceText(amount, currency, interval, count) {
  const money = formatMoney(amount, currency);
  return interval ? `${money} / ${every(interval, count)}` : money;
}

function statusBadge(element, status) {
  const value = String(status || "");
  element.textContent = STATUS_LABELS[value] || value;
  element.dataset.status = value;
  element.className = `badge badge-${value.replace(/[^a-z]/g, "")}`;
}

// Only the web addresses Stripe (or the local stand-in) answers with are followed: http(s) only.
function externalUrl(value) {
  const url = new URL(value, location.origin);
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new Error("unexpected address");
  return url.href;
}

// A POST with a fresh Idempotency-Key: a retry of the same click (network hiccup, the same key still
// being served) can never act twice.
async function post(path, body) {
  const key = uuid4();
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await api(path, { method: "POST", body, headers: { "Idempotency-Key": key } });
    } catch (err) {
      const retry = err instanceof ApiError && (err.code === "idempotency_in_progress" || err.status === 0);
      if (!retry || attempt >= 10) throw err;
      await sleep(500);
    }
  }
}

async function allPages(path) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const query = new URLSearchParams({ limit: "100" });
    if (cursor) query.set("cursor", cursor);
    const result = await api(`${path}?${query}`);
    items.push(...result.items);
    if (!result.hasMore || !result.nextCursor) break;
    cursor = result.nextCursor;
  }
  return items;
}

function fact(label, value, testid) {
  return [el("dt", { text: label }), el("dd", { text: value, attrs: { "data-testid": testid } })];
}

// -- loading -----------------------------------------------------------------------------------

async function loadPlans() {
  plans = await allPages("/api/plans");
  prices.clear();
  for (const plan of plans) {
    for (const price of plan.prices || []) prices.set(price.id, { price, plan });
  }
}

async function loadSubscriptions() {
  subscriptions = await allPages("/api/subscriptions");
  return subscriptions;
}

async function loadClientCurrency() {
  if (!me || !me.clientId) return;
  try {
    clientCurrency = upper((await api(`/api/clients/${encodeURIComponent(me.clientId)}`)).currency) || null;
  } catch (_) {
    clientCurrency = null; // unknown: every active price is offered
  }
}

function current(list) {
  return list.filter((s) => !ENDED.has(s.status));
}

// -- rendering ---------------------------------------------------------------------------------

function render() {
  const isClient = me && me.role === "client";
  const live = current(subscriptions);
  const past = subscriptions.filter((s) => ENDED.has(s.status));

  $("subscriptions").replaceChildren(...live.map((s) => subscriptionCard(s, isClient)));
  $("subscriptions").hidden = live.length === 0;

  $("past-rows").replaceChildren(...past.map((s) => el("tr", { attrs: { "data-testid": "past-subscription" } }, [
    el("td", { text: s.planName || "Subscription" }),
    el("td", {}, [badge(s.status)]),
    el("td", { text: formatDay(s.endedAt || s.canceledAt) }),
  ])));
  $("past-section").hidden = past.length === 0;

  // A client with any subscription (even an ended one) has a Stripe customer, so a billing portal.
  $("billing-actions").hidden = !isClient || subscriptions.length === 0 || leaving;

  // No current subscription: the plans, unless a checkout is being confirmed (no second signup then).
  const offer = isClient && live.length === 0 && !confirming;
  $("plans-section").hidden = !offer;
  if (offer) renderPlans();
  hide($("loading"));
}

function badge(status) {
  const span = el("span");
  statusBadge(span, status);
  return span;
}

function offeredPrices(plan) {
  return (plan.prices || []).filter((p) => p.active !== false && (!clientCurrency || upper(p.currency) === clientCurrency));
}

function renderPlans() {
  const cards = [];
  for (const plan of plans) {
    const offered = offeredPrices(plan);
    if (!plan.active || offered.length === 0) continue;
    const rows = offered.map((price) => {
      const button = el("button", {
        text: "Subscribe", className: "button primary",
        attrs: { type: "button", "data-testid": "subscribe", "data-price-id": price.id },
      });
      button.addEventListener("click", () => subscribe(price, button));
      return el("li", { className: "price-row", attrs: { "data-testid": "plan-price", "data-price-id": price.id } }, [
        el("span", { className: "price", text: priceText(price.amount, price.currency, price.interval, price.intervalCount) }),
        el("span", { className: "muted", text: price.trialDays > 0 ? `${price.trialDays}-day free trial` : "" }),
        button,
      ]);
    });
    const children = [el("h3", { text: plan.name, attrs: { "data-testid": "plan-name" } })];
    if (plan.description) children.push(el("p", { text: plan.description, className: "muted" }));
    if ((plan.features || []).length) {
      children.push(el("ul", { className: "features" }, plan.features.map((f) => el("li", { text: f }))));
    }
    children.push(el("ul", { className: "price-list" }, rows));
    cards.push(el("article", { className: "card plan", attrs: { "data-testid": "plan", "data-plan-id": plan.id } },
      children));
  }
  $("plans").replaceChildren(...cards);
  $("plans-empty").hidden = cards.length !== 0;
}

function nextBilling(s) {
  // What the next invoice bills: the pending change's price from the renewal on, else the current one.
  if (s.cancelAtPeriodEnd || s.status === "paused" || ENDED.has(s.status)) return null;
  const when = s.status === "trialing" ? s.trialEnd || s.currentPeriodEnd : s.currentPeriodEnd;
  if (!when) return null;
  let amount = s.unitAmount === null || s.unitAmount === undefined ? null : s.unitAmount * s.quantity;
  if (s.pendingChange) {
    const pending = prices.get(s.pendingChange.priceId);
    amount = pending ? pending.price.amount * s.pendingChange.quantity : null;
  }
  return { when, amount };
}

function subscriptionCard(s, actionable) {
  const cur = s.currency;
  const facts = [
    ...fact("Price", priceText(s.unitAmount, cur, s.interval, s.intervalCount), "sub-price"),
    ...fact("Quantity", String(s.quantity), "sub-quantity"),
  ];
  if (s.status === "trialing" && s.trialEnd) facts.push(...fact("Trial ends", formatDay(s.trialEnd), "sub-trial-end"));
  const next = nextBilling(s);
  if (next) {
    facts.push(...fact("Next billing", formatDay(next.when), "sub-next-billing"));
    facts.push(...fact("Next amount", formatMoney(next.amount, cur), "sub-next-amount"));
  }
  if (s.cancelAtPeriodEnd) facts.push(...fact("Ends on", formatDay(s.currentPeriodEnd), "sub-ends-on"));
  if (s.accessUntil) facts.push(...fact("Access until", formatDay(s.accessUntil), "sub-access-until"));
  if (s.pendingChange) {
    const pending = prices.get(s.pendingChange.priceId);
    const what = pending
      ? `${pending.plan.name} (${priceText(pending.price.amount, pending.price.currency, pending.price.interval,
        pending.price.intervalCount)}) × ${s.pendingChange.quantity}`
      : `another plan × ${s.pendingChange.quantity}`;
    facts.push(...fact("Scheduled change", `${what} from ${formatDay(s.pendingChange.effectiveAt)}`, "sub-pending"));
  }

  const title = el("h2", {}, [
    el("span", { text: s.planName || "Subscription", attrs: { "data-testid": "sub-plan" } }), " ",
    badgeWithId(s.status),
  ]);
  const children = [title, el("dl", { className: "facts" }, facts)];

  if (s.status === "past_due" || s.status === "unpaid" || s.status === "incomplete") {
    children.push(el("p", {
      className: "alert alert-warning", attrs: { "data-testid": "sub-notice" },
      text: "We could not charge your card. Update it under “Manage billing”; the payment is retried automatically.",
    }));
  }
  if (s.cancelAtPeriodEnd) {
    children.push(el("p", {
      className: "alert alert-info", attrs: { "data-testid": "sub-cancel-notice" },
      text: `Cancelled: your subscription ends on ${formatDay(s.currentPeriodEnd)}. You keep access until then.`,
    }));
  }

  const card = el("article", {
    className: "card subscription", attrs: { "data-testid": "subscription", "data-subscription-id": s.id },
  }, children);
  if (actionable) card.append(...actions(s, card));
  return card;
}

function badgeWithId(status) {
  const span = badge(status);
  span.setAttribute("data-testid", "sub-status");
  return span;
}

// -- actions -----------------------------------------------------------------------------------

function actions(s, card) {
  const message = el("p", { className: "alert alert-success", attrs: { role: "status", "data-testid": "sub-message" } });
  const error = el("p", { className: "alert alert-error", attrs: { role: "alert", "data-testid": "sub-error" } });
  message.hidden = error.hidden = true;
  const bar = el("p", { className: "sub-actions" });
  const panels = el("div");
  const ui = { card, bar, panels, message, error, buttons: [] };

  const button = (text, testid, handler, primary = false) => {
    const b = el("button", { text, className: primary ? "button primary" : "button", attrs: { type: "button", "data-testid": testid } });
    b.addEventListener("click", () => handler(s, ui));
    ui.buttons.push(b);
    bar.append(b);
    return b;
  };
  const changeable = CHANGEABLE.has(s.status) && !s.pendingChange && !s.cancelAtPeriodEnd;
  if (changeable) button("Change plan", "change-plan", openChange, true);
  if (s.cancelAtPeriodEnd || s.status === "paused") button("Resume", "resume", resume, true);
  else if (CANCELLABLE.has(s.status)) button("Cancel at period end", "cancel", openCancel);
  return [bar, panels, message, error];
}

function busy(ui, on) {
  for (const b of ui.buttons) b.disabled = on;
  for (const b of ui.panels.querySelectorAll("button, select, input")) b.disabled = on;
}

function say(ui, text) {
  hide(ui.error);
  show(ui.message, text);
}

function fail(ui, err, fallback) {
  hide(ui.message);
  show(ui.error, err && err.message ? err.message : fallback);
}

// Replace the card with the subscription as the API now has it (keeping the message shown).
function replaceSubscription(updated, text) {
  subscriptions = subscriptions.map((s) => (s.id === updated.id ? updated : s));
  render();
  if (text) {
    const card = document.querySelector(`[data-testid="subscription"][data-subscription-id="${CSS.escape(updated.id)}"]`);
    const message = card && card.querySelector('[data-testid="sub-message"]');
    if (message) show(message, text);
  }
}

// Change plan: choose a price, see Stripe's preview (prorations, due now, next invoice), confirm.
function openChange(s, ui) {
  hide(ui.message);
  hide(ui.error);
  const options = [];
  for (const plan of plans) {
    for (const price of offeredPricesFor(plan, s.currency)) {
      const label = `${plan.name}: ${priceText(price.amount, price.currency, price.interval, price.intervalCount)}`
        + (price.id === s.priceId ? " (current)" : "");
      options.push(el("option", { text: label, attrs: { value: price.id } }));
    }
  }
  if (options.length <= 1 && options.every((o) => o.value === s.priceId)) {
    ui.panels.replaceChildren(el("p", { className: "muted", text: "No other plan is offered at the moment." }));
    return;
  }
  const select = el("select", { attrs: { id: `change-price-${s.id}`, "data-testid": "change-price" } }, options);
  const firstOther = options.find((o) => o.value !== s.priceId);
  if (firstOther) select.value = firstOther.value;
  const quantity = el("input", {
    attrs: { id: `change-quantity-${s.id}`, type: "number", min: "1", max: "10000", step: "1",
      value: String(s.quantity), "data-testid": "change-quantity", inputmode: "numeric" },
  });
  const previewButton = el("button", { text: "Preview the change", className: "button primary", attrs: { type: "button", "data-testid": "preview" } });
  const close = el("button", { text: "Close", className: "button", attrs: { type: "button", "data-testid": "close-change" } });
  const box = el("div", { className: "preview", attrs: { "data-testid": "preview-box" } });
  box.hidden = true;
  let preview = null; // { priceId, quantity, body }: only a preview of exactly this choice is confirmed

  const discard = () => { preview = null; box.hidden = true; box.replaceChildren(); };
  select.addEventListener("change", discard);
  quantity.addEventListener("input", discard);
  close.addEventListener("click", () => ui.panels.replaceChildren());

  previewButton.addEventListener("click", async () => {
    const qty = Number.parseInt(quantity.value, 10);
    if (!Number.isInteger(qty) || qty < 1 || qty > 10000) {
      fail(ui, null, "Enter a quantity from 1 to 10,000.");
      return;
    }
    hide(ui.error);
    discard();
    busy(ui, true);
    previewButton.textContent = "Calculating…";
    try {
      const query = new URLSearchParams({ priceId: select.value, quantity: String(qty) });
      const body = await api(`/api/subscriptions/${encodeURIComponent(s.id)}/change-preview?${query}`);
      preview = { priceId: select.value, quantity: qty, body };
      renderPreview(s, ui, box, preview, () => discard());
    } catch (err) {
      fail(ui, err, "The preview could not be calculated.");
    } finally {
      previewButton.textContent = "Preview the change";
      busy(ui, false);
    }
  });

  ui.panels.replaceChildren(el("div", { className: "panel", attrs: { "data-testid": "change-panel" } }, [
    el("h3", { text: "Change plan" }),
    el("div", { className: "form-row" }, [
      el("label", { text: "New plan", attrs: { for: select.id } }), select,
      el("label", { text: "Quantity", attrs: { for: quantity.id } }), quantity,
    ]),
    el("p", {}, [previewButton, " ", close]),
    box,
  ]));
  select.focus();
}

function offeredPricesFor(plan, currency) {
  if (!plan.active) return [];
  return (plan.prices || []).filter((p) => p.active !== false && upper(p.currency) === upper(currency));
}

function renderPreview(s, ui, box, preview, discard) {
  const p = preview.body;
  const cur = p.currency;
  const lines = p.lines.map((line) => el("tr", { attrs: { "data-testid": "preview-line" } }, [
    el("td", { text: line.description || (line.proration ? "Proration" : "Subscription") }),
    el("td", { text: line.periodStart ? `${formatDay(line.periodStart)} – ${formatDay(line.periodEnd)}` : "—" }),
    el("td", { text: formatMoney(line.amount, line.currency || cur), className: "num" }),
  ]));
  const effective = p.effective === "now"
    ? "The change takes effect now."
    : `The change takes effect at the end of the current period, on ${formatDay(s.currentPeriodEnd)}.`;
  const confirm = el("button", { text: "Confirm the change", className: "button primary", attrs: { type: "button", "data-testid": "confirm-change" } });
  const back = el("button", { text: "Back", className: "button", attrs: { type: "button", "data-testid": "cancel-change" } });
  back.addEventListener("click", discard);
  confirm.addEventListener("click", async () => {
    busy(ui, true);
    confirm.textContent = "Changing…";
    try {
      const updated = await post(`/api/subscriptions/${encodeURIComponent(s.id)}/change`, {
        priceId: preview.priceId, quantity: preview.quantity, prorationDate: p.prorationDate,
      });
      replaceSubscription(updated, p.effective === "now"
        ? "Your plan has been changed."
        : `Your plan changes on ${formatDay(s.currentPeriodEnd)}.`);
    } catch (err) {
      busy(ui, false);
      confirm.textContent = "Confirm the change";
      if (err instanceof ApiError && err.code === "proration_date_out_of_period") {
        discard();
        fail(ui, null, "The billing period has moved on since the preview: preview the change again.");
      } else {
        fail(ui, err, "The plan could not be changed.");
      }
      if (err instanceof ApiError && err.status === 409) refresh();
    }
  });
  box.replaceChildren(
    el("p", { text: `${KIND_LABELS[p.kind] || "Change"}. ${effective}`, attrs: { "data-testid": "preview-effective" } }),
    el("div", { className: "table-wrap" }, [el("table", { className: "table", attrs: { "data-testid": "preview-lines" } }, [
      el("thead", {}, [el("tr", {}, [
        el("th", { text: "Description", attrs: { scope: "col" } }),
        el("th", { text: "Period", attrs: { scope: "col" } }),
        el("th", { text: "Amount", className: "num", attrs: { scope: "col" } }),
      ])]),
      el("tbody", {}, lines),
    ])]),
    el("table", { className: "totals" }, [el("tbody", {}, [
      el("tr", { className: "total-row" }, [
        el("th", { text: "Due now", attrs: { scope: "row" } }),
        el("td", { text: formatMoney(p.amountDueNow, cur), className: "num", attrs: { "data-testid": "preview-due-now" } }),
      ]),
      el("tr", {}, [
        el("th", { text: "Next invoice", attrs: { scope: "row" } }),
        el("td", { text: formatMoney(p.nextInvoiceTotal, cur), className: "num", attrs: { "data-testid": "preview-next-total" } }),
      ]),
    ])]),
    el("p", { className: "muted", text: p.amountDueNow > 0 ? "The amount due now is charged to your card on file." : "" }),
    el("p", {}, [confirm, " ", back]),
  );
  box.hidden = false;
  confirm.focus();
}

function openCancel(s, ui) {
  hide(ui.message);
  hide(ui.error);
  const confirm = el("button", { text: "Confirm cancellation", className: "button danger", attrs: { type: "button", "data-testid": "confirm-cancel" } });
  const keep = el("button", { text: "Keep my subscription", className: "button", attrs: { type: "button", "data-testid": "keep" } });
  keep.addEventListener("click", () => ui.panels.replaceChildren());
  confirm.addEventListener("click", async () => {
    busy(ui, true);
    try {
      const updated = await post(`/api/subscriptions/${encodeURIComponent(s.id)}/cancel`, { atPeriodEnd: true });
      replaceSubscription(updated, "Your cancellation is recorded.");
    } catch (err) {
      busy(ui, false);
      fail(ui, err, "The subscription could not be cancelled.");
      if (err instanceof ApiError && err.status === 409) refresh();
    }
  });
  ui.panels.replaceChildren(el("div", { className: "panel", attrs: { "data-testid": "cancel-panel" } }, [
    el("p", { text: `Your subscription will end on ${formatDay(s.currentPeriodEnd)}, the end of the period you `
      + "have paid for; you keep access until then and are not billed again. You can resume it until then." }),
    el("p", {}, [confirm, " ", keep]),
  ]));
  confirm.focus();
}

async function resume(s, ui) {
  hide(ui.message);
  hide(ui.error);
  busy(ui, true);
  try {
    const updated = await post(`/api/subscriptions/${encodeURIComponent(s.id)}/resume`);
    replaceSubscription(updated, "Your subscription continues.");
  } catch (err) {
    busy(ui, false);
    fail(ui, err, "The subscription could not be resumed.");
    if (err instanceof ApiError && err.status === 409) refresh();
  }
}

async function manageBilling() {
  if (leaving) return;
  const button = $("manage-billing");
  hide($("billing-error"));
  button.disabled = true;
  button.textContent = "Opening…";
  try {
    const result = await post("/api/billing-portal");
    leaving = true;
    location.assign(externalUrl(result.url));
  } catch (err) {
    button.disabled = false;
    button.textContent = "Manage billing";
    show($("billing-error"), err.message || "The billing portal could not be opened.");
  }
}

async function subscribe(price, button) {
  if (leaving || confirming) return; // a double click: the first is on its way
  leaving = true;
  hide($("subscribe-error"));
  for (const b of document.querySelectorAll('[data-testid="subscribe"]')) b.disabled = true;
  button.textContent = "Opening checkout…";
  try {
    const result = await post("/api/subscriptions/checkout", { priceId: price.id, quantity: 1 });
    location.assign(externalUrl(result.url));
    // stay "leaving": the browser is on its way to the checkout page
  } catch (err) {
    leaving = false;
    for (const b of document.querySelectorAll('[data-testid="subscribe"]')) b.disabled = false;
    button.textContent = "Subscribe";
    show($("subscribe-error"), err.message || "The checkout could not be opened.");
  }
}

// -- back from Checkout ------------------------------------------------------------------------

async function followCheckout() {
  // "processing" until the mirror (fed by Stripe's webhooks) shows the subscription: the redirect to
  // this page proves nothing.
  confirming = true;
  render();
  const started = Date.now();
  for (let polls = 0; ; polls += 1) {
    setStatus("info", "Processing your subscription… This page updates by itself once Stripe confirms it.");
    try {
      if (current(await loadSubscriptions()).length > 0) {
        confirming = false;
        setStatus("success", "Your subscription is confirmed. Thank you!");
        history.replaceState(null, "", location.pathname); // a reload shows the page, not this return
        render();
        return;
      }
    } catch (_) {
      // a hiccup: keep polling
    }
    if (Date.now() - started > MAX_POLL_MS) {
      confirming = false;
      setStatus("info", "Your subscription is still being confirmed. Check back in a few minutes.");
      render();
      return;
    }
    await sleep(polls < FAST_POLLS ? POLL_FAST_MS : POLL_SLOW_MS);
  }
}

async function refresh() {
  try {
    await loadSubscriptions();
    render();
  } catch (err) {
    show(pageError, err.message);
  }
}

// -- start -------------------------------------------------------------------------------------

async function main() {
  setupHeader();
  $("manage-billing").addEventListener("click", manageBilling);
  // Back from Checkout or the billing portal with the browser's back button (page restored from cache).
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) {
      leaving = false;
      const button = $("manage-billing");
      button.disabled = false;
      button.textContent = "Manage billing";
      refresh();
    }
  });
  try {
    me = await api("/api/auth/me");
    await Promise.all([loadPlans(), loadSubscriptions(), loadClientCurrency()]);
  } catch (err) {
    hide($("loading"));
    show(pageError, err.message);
    return;
  }
  if (me.role !== "client") {
    setStatus("info", "Signed in as an admin: this is the clients' page. Manage subscriptions in the admin UI.");
  }
  render();
  if (checkoutResult === "success") {
    followCheckout();
  } else if (checkoutResult === "cancel" || checkoutResult === "cancelled") {
    setStatus("warning", "Checkout cancelled. Nothing was charged.");
  }
}

if (requireLogin()) main();
