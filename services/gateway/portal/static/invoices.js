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

async function load() {
  const page = currentPage();
  hide(pageError);
  show(loading);
  try {
    const params = new URLSearchParams({ page: String(page), pageSize: String(PAGE_SIZE), sort: "-createdAt" });
    const result = await api(`/api/invoices?${params}`);
    rows.replaceChildren(...result.items.map(row));
    const pages = Math.max(1, Math.ceil(result.total / PAGE_SIZE));
    if (result.total === 0) {
      hide(table);
      show(empty);
    } else {
      hide(empty);
      show(table);
    }
    if (page > pages && result.total > 0) {
      goTo(pages);
      return;
    }
    pager.hidden = pages <= 1;
    pageInfo.textContent = `Page ${page} of ${pages} · ${result.total} invoice${result.total === 1 ? "" : "s"}`;
    prev.disabled = page <= 1;
    next.disabled = page >= pages;
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
