// Shared helpers of the client portal: the bearer token, API calls, formatting, small DOM helpers.
// Every piece of data reaches the page through textContent (never parsed as HTML), and the token lives in
// sessionStorage only: it is never put in a URL.

const TOKEN_KEY = "portal.accessToken";

export const OPEN_STATUSES = new Set(["SENT", "VIEWED", "PARTIAL", "OVERDUE"]);

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// Only a path inside the portal is accepted as where to go after logging in (no open redirect).
export function safeNext(value) {
  if (typeof value !== "string" || !value.startsWith("/portal/") || value.startsWith("//")) return null;
  if (value.startsWith("/portal/login") || value.includes("\\")) return null;
  return value;
}

export function goToLogin() {
  clearToken();
  const next = location.pathname + location.search;
  const target = new URL("/portal/login", location.origin);
  if (safeNext(next)) target.searchParams.set("next", next);
  location.replace(target.pathname + target.search);
}

// Call the gateway's API with the bearer token. A 401 ends the session: back to the login page.
export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export async function api(path, { method = "GET", body, headers = {}, raw = false } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store" };
  const current = token();
  if (current) init.headers.Authorization = `Bearer ${current}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network_error", "The server cannot be reached. Check your connection and retry.");
  }
  if (response.status === 401 && current) {
    goToLogin();
    throw new ApiError(401, "unauthorized", "Your session has ended. Please sign in again.");
  }
  if (!response.ok) {
    let code = "error";
    let message = `The request failed (HTTP ${response.status}).`;
    let details = null;
    try {
      const err = (await response.json()).error;
      if (err && typeof err.message === "string") {
        code = err.code || code;
        message = err.message;
        details = err.details ?? null;
      }
    } catch (_) {
      // not a JSON error body: keep the generic message
    }
    throw new ApiError(response.status, code, message, details);
  }
  return raw ? response : response.json();
}

// Pages behind the login: no token, straight to the login page.
export function requireLogin() {
  if (!token()) {
    goToLogin();
    return false;
  }
  return true;
}

export function setupHeader() {
  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", () => {
      clearToken();
      location.assign("/portal/login");
    });
  }
  const whoami = document.getElementById("whoami");
  if (whoami) {
    api("/api/auth/me")
      .then((me) => { whoami.textContent = me.email || ""; })
      .catch(() => {});
  }
}

// -- formatting ------------------------------------------------------------------------------------

const formatters = new Map();

function currencyFormatter(currency) {
  const code = String(currency || "").toUpperCase();
  if (!formatters.has(code)) {
    let fmt;
    try {
      fmt = new Intl.NumberFormat(undefined, { style: "currency", currency: code });
    } catch (_) {
      fmt = null; // not a currency this browser knows
    }
    formatters.set(code, fmt);
  }
  return formatters.get(code);
}

// The currency's number of minor-unit digits (CLDR, as the API's money code uses): 2 for EUR, 0 for JPY.
export function fractionDigits(currency) {
  const fmt = currencyFormatter(currency);
  return fmt ? fmt.resolvedOptions().maximumFractionDigits : 2;
}

// Amounts are integers in minor units; shown with exactly the currency's digits (Intl rounds the
// quotient, so a float's last-bit error never shows).
export function formatMoney(minor, currency) {
  if (minor === null || minor === undefined || !Number.isFinite(Number(minor))) return "—";
  const code = String(currency || "").toUpperCase();
  const digits = fractionDigits(code);
  const value = Number(minor) / 10 ** digits;
  const fmt = currencyFormatter(code);
  if (!fmt) return `${value.toFixed(digits)} ${code}`;
  return fmt.format(value);
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

// "2026-03-01" (a calendar date, no time zone) -> "Mar 1, 2026".
export function formatDate(value) {
  if (!value) return "—";
  const match = /^(\d{4})-(\d{2})-(\d{2})$/.exec(value);
  if (!match) return String(value);
  return dateFormat.format(new Date(Date.UTC(+match[1], +match[2] - 1, +match[3])));
}

// A moment from the API ("2026-03-01T10:00:00Z") as the day it falls on where the reader is.
const dayFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });

export function formatDay(value) {
  if (!value) return "—";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : dayFormat.format(date);
}

export function formatDateTime(value) {
  if (!value) return "—";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : dateTimeFormat.format(date);
}

// A Decimal from the API as a string ("2.0000" -> "2", "1.2500" -> "1.25"), kept exact.
export function formatQuantity(value) {
  const text = String(value ?? "");
  return /^-?\d+\.\d+$/.test(text) ? text.replace(/\.?0+$/, "") : text;
}

export function formatPercent(value) {
  if (value === null || value === undefined || value === "") return "—";
  return `${formatQuantity(value)}%`;
}

const STATUS_LABELS = {
  DRAFT: "Draft", SENT: "Sent", VIEWED: "Viewed", PARTIAL: "Partially paid", PAID: "Paid",
  OVERDUE: "Overdue", CANCELLED: "Cancelled",
};

export function statusBadge(element, status) {
  const value = String(status || "");
  element.textContent = STATUS_LABELS[value] || value;
  element.dataset.status = value;
  element.className = `badge badge-${value.toLowerCase().replace(/[^a-z]/g, "")}`;
}

// -- DOM helpers -----------------------------------------------------------------------------------

export function el(tag, { text, className, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

export function show(element, message) {
  if (message !== undefined) element.textContent = message;
  element.hidden = false;
}

export function hide(element) {
  element.hidden = true;
}

// A v4 UUID; crypto.randomUUID needs a secure context, getRandomValues does not.
export function uuid4() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
