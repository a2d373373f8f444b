import { ApiError, api, clearToken, hide, safeNext, setToken, show } from "./portal.js";

const form = document.getElementById("login-form");
const email = document.getElementById("email");
const password = document.getElementById("password");
const error = document.getElementById("login-error");
const submit = document.getElementById("login-submit");

clearToken(); // arriving here means signing in afresh

function destination() {
  return safeNext(new URLSearchParams(location.search).get("next")) || "/portal/invoices";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  hide(error);
  if (!email.value.trim() || !password.value) {
    show(error, "Enter your email and password.");
    return;
  }
  submit.disabled = true;
  try {
    const result = await api("/api/auth/login", {
      method: "POST",
      body: { email: email.value.trim(), password: password.value },
    });
    setToken(result.accessToken);
    location.replace(destination());
  } catch (err) {
    password.value = "";
    if (err instanceof ApiError && err.status === 401) {
      show(error, "Wrong email or password.");
    } else if (err instanceof ApiError && err.status === 422) {
      show(error, "Enter a valid email address and your password.");
    } else if (err instanceof ApiError && err.status === 429) {
      show(error, "Too many attempts. Wait a moment and try again.");
    } else {
      show(error, err instanceof ApiError ? err.message : "Signing in failed. Try again.");
    }
    password.focus();
  } finally {
    submit.disabled = false;
  }
});

email.focus();
