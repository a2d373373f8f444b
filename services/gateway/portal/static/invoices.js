import {
  api, el, formatDate, formatMoney, hide, requireLogin, setupHeader, show, statusBadge,
} from "./portal.js";

const PAGE_SIZE = 20;

const rows = document.getElementById("invoice-rows");
const table = document.getElementById("invoice-table");
const empty = document.getElementById("empty");
const loading = document.getElementById("loading");
const pageError = document.getElementById("page-error");
const pager = document.getElementById("pager");
const prev = document.getElementById("prev-page");
const next = document.getElementById("next-page");
const pageInfo = document.getElementById("page-info");

function currentPage() {
  const value = Number.parseInt(new URLSearchParams(location.search).get("page") || "1", 10);
  return Number.isFinite(value) && value >= 1 ? value : 1;
}

function goTo(page) {
  const url = new URL(location.href);
  if (page > 1) url.searchParams.set("page", String(page));
  else url.searchParams.delete("page");
  history.pushState(null, "", url.pathname + url.search);
  load();
}

function row(invoice) {
  const href = `/portal/invoices/${encodeURIComponent(invoice.id)}`;
  const link = el("a", { text: invoice.invoiceNumber || "Draft", attrs: { href, "data-testid": "invoice-link" } });
  const badge = el("span");
  statusBadge(badge, invoice.status);
  const tr = el("tr", { attrs: { "data-invoice-id": invoice.id, "data-testid": "invoice-row" } }, [
    el("td", {}, [link]),
    el("td", {}, [badge]),
    el("td", { text: formatDate(invoice.issueDate) }),
    el("td", { text: formatDate(invoice.dueDate) }),
    el("td", { text: formatMoney(invoice.total, invoice.currency), className: "num" }),
    el("td", {
      text: formatMoney(invoice.amountDue, invoice.currency),
      className: "num",
      attrs: { "data-testid": "invoice-amount-due" },
    }),
  ]);
  tr.addEventListener("click", (event) => {
    if (event.target.closest("a")) return;
    location.assign(href);
  });
  return tr;
}

// The API pages with cursors; the portal keeps page numbers in its own URL. cursors[n] is the
// cursor of page n + 1 (page 1 has none), learned as pages are read.
const cursors = [""];

function listUrl(cursor) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), sort: "-createdAt" });
  if (cursor) params.set("cursor", cursor);
  return `/api/invoices?${params}`;
}

async function fetchPage(page) {
  // A reload or a pasted ?page=N: walk forward from the last page whose cursor is known.
  while (cursors.length < page) {
    const known = await api(listUrl(cursors[cursors.length - 1]));
    if (!known.nextCursor) break; // fewer pages than asked for
    cursors.push(known.nextCursor);
  }
  const index = Math.min(page, cursors.length) - 1;
  const result = await api(listUrl(cursors[index]));
  if (result.nextCursor && cursors.length === index + 1) cursors.push(result.nextCursor);
  return { shown: index + 1, result };
}

async function load() {
  const page = currentPage();
  hide(pageError);
  show(loading);
  try {
    const { shown, result } = await fetchPage(page);
    if (shown !== page) {
      goTo(shown);
      return;
    }
    rows.replaceChildren(...result.items.map(row));
    const pages = Math.max(1, Math.ceil(result.total / PAGE_SIZE));
    if (result.total === 0) {
      hide(table);
      show(empty);
    } else {
      hide(empty);
      show(table);
    }
    pager.hidden = pages <= 1;
    pageInfo.textContent = `Page ${page} of ${pages} · ${result.total} invoice${result.total === 1 ? "" : "s"}`;
    prev.disabled = page <= 1;
    next.disabled = !result.hasMore;
  } catch (err) {
    show(pageError, err.message);
  } finally {
    hide(loading);
  }
}

if (requireLogin()) {
  setupHeader();
  prev.addEventListener("click", () => goTo(currentPage() - 1));
  next.addEventListener("click", () => goTo(currentPage() + 1));
  window.addEventListener("popstate", load);
  load();
}
