// The admin pages' only script of their own besides the charts: it hands htmx the CSRF token. Pages
// work without it (every form also carries the token as a hidden field); it never builds HTML.
"use strict";

document.addEventListener("htmx:configRequest", (event) => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (meta && meta.content) event.detail.headers["X-CSRF-Token"] = meta.content;
});

// A form is sent once: a second click while the first submit is on its way does nothing (it would
// record a payment twice). A page restored by the back button can be submitted again.
document.addEventListener("submit", (event) => {
  const form = event.target;
  // getAttribute: a field named "method" (the payment form has one) shadows form.method.
  if (!(form instanceof HTMLFormElement) || (form.getAttribute("method") || "").toLowerCase() !== "post") return;
  if (form.dataset.submitting) {
    event.preventDefault();
    return;
  }
  form.dataset.submitting = "1";
});
window.addEventListener("pageshow", () => {
  for (const form of document.querySelectorAll("form[data-submitting]")) delete form.dataset.submitting;
});

// A request htmx could not complete (the server is down, a 5xx): say so instead of doing nothing.
document.addEventListener("htmx:responseError", (event) => {
  const status = event.detail.xhr ? event.detail.xhr.status : 0;
  showProblem(status === 403 ? "This page has expired: reload it and try again." :
    "The server could not do that just now. Try again in a moment.");
});
document.addEventListener("htmx:sendError", () => showProblem("The server cannot be reached. Check your connection."));

function showProblem(text) {
  let box = document.getElementById("request-problem");
  if (!box) {
    box = document.createElement("p");
    box.id = "request-problem";
    box.className = "alert alert-error floating";
    box.setAttribute("role", "alert");
    document.body.appendChild(box);
  }
  box.textContent = text;
}

// A file too large for its form (data-max-bytes) is refused here, in the field's error slot, before
// megabytes travel only to be refused (past the gateway's body limit that refusal would not be a page).
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement)) return;
  for (const input of form.querySelectorAll("input[type=file][data-max-bytes]")) {
    const limit = Number(input.dataset.maxBytes);
    const file = input.files && input.files[0];
    if (!file || !(file.size > limit)) continue;
    event.preventDefault();
    event.stopImmediatePropagation();
    delete form.dataset.submitting;
    const slot = document.getElementById((input.getAttribute("aria-describedby") || "").split(" ")[0]);
    if (slot) slot.textContent = input.dataset.tooLarge || "This file is too large.";
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  }
}, true);
