// Markdown for untrusted text (model output, tool results): marked renders it, DOMPurify sanitises the HTML,
// highlight.js colours code blocks (all three vendored under /static/vendor, see VENDOR.md).
// Three walls, each enough alone for script: (1) raw HTML in the text is shown as text, never parsed (marked's
// html renderer is replaced by an escaper); (2) links keep only http(s) and mailto targets, and no images are
// made (a remote image is how injected text exfiltrates data); (3) DOMPurify removes whatever else could run,
// with the page's Content-Security-Policy (script-src 'self') behind it. highlight.js reads textContent.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  marked.use({
    gfm: true,
    breaks: true,
    renderer: {
      html(token) { return escapeHtml(token.text); },
      link(token) {
        const text = this.parser.parseInline(token.tokens);
        if (!SAFE_URL.test(token.href)) return text;
        return `<a href="${escapeHtml(token.href)}" rel="noopener noreferrer nofollow" target="_blank">${text}</a>`;
      },
      image(token) { return escapeHtml(token.text || ""); },
    },
  });

  const PURIFY = {
    ALLOWED_TAGS: ["p", "br", "hr", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a", "h1", "h2",
                   "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span"],
    ALLOWED_ATTR: ["href", "rel", "target", "class", "start", "align"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  };

  function render(source) {
    return DOMPurify.sanitize(marked.parse(String(source)), PURIFY);
  }

  // Highlight and add a copy button to each code block of a rendered element (after it is in the page).
  function decorate(root) {
    for (const code of root.querySelectorAll("pre > code")) {
      if (code.dataset.done) continue;
      code.dataset.done = "1";
      if (window.hljs) window.hljs.highlightElement(code);
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy-code";
      copy.textContent = "Copy";
      copy.onclick = () => copyText(code.textContent, copy);
      code.parentElement.append(copy);
    }
  }

  function copyText(text, button) {
    const done = () => { const was = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = was; }, 1200); };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, () => fallback(text, done));
    else fallback(text, done);
  }

  function fallback(text, done) {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    try { document.execCommand("copy"); } finally { area.remove(); }
    done();
  }

  window.hljs && window.hljs.configure({ ignoreUnescapedHTML: true });
  window.renderMarkdown = render;
  window.decorateMarkdown = decorate;
  window.copyText = copyText;
})();
