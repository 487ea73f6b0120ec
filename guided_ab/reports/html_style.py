"""The stylesheet of report.html, inlined in its <style> element (the page loads nothing from
outside). A Python constant rather than a .css data file, so that it needs no package data.
"""

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--ok:#15803d;--bad:#b91c1c;--warn:#b45309;--info:#1d4ed8}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:26px;margin:2px 0 4px}h2{font-size:18px;margin:0 0 10px}h3{font-size:14px;margin:16px 0 6px;color:#374151}
section,header{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:0 0 16px}
.eyebrow{text-transform:uppercase;letter-spacing:.08em;font-size:11px;color:var(--muted)}
.muted{color:var(--muted)}.small{font-size:12px}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f5f9;padding:1px 4px;border-radius:4px}
.meta{display:flex;flex-wrap:wrap;gap:8px 24px;margin:10px 0}.meta div{display:flex;flex-direction:column}.meta span{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.arms-list{margin:6px 0 0;padding-left:18px}
.banner{border-width:0;border-left:8px solid;padding:18px 22px}
.banner .verdict{display:flex;align-items:baseline;gap:12px;flex-wrap:wrap}
.banner .vlabel{text-transform:uppercase;font-size:11px;letter-spacing:.1em;opacity:.8}
.banner .vtext{font-size:24px;font-weight:700}
.banner .serve{margin:4px 0 8px}.banner .reasons{margin:6px 0 0;padding-left:20px}.banner .need{margin:8px 0 0}
.v-switch{background:#ecfdf5;border-color:var(--ok);color:#064e3b}
.v-keep{background:#eff6ff;border-color:var(--info);color:#1e3a8a}
.v-inconclusive{background:#fffbeb;border-color:#d97706;color:#78350f}
.v-invalid{background:#fef2f2;border-color:var(--bad);color:#7f1d1d}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px;margin:8px 0}
.card{border:1px solid var(--line);border-top:5px solid;border-radius:8px;padding:10px 14px}
.card-h{margin-bottom:6px}.card dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
.card dt{color:var(--muted)}.card dd{margin:0;font-variant-numeric:tabular-nums}
.ci{color:var(--muted);font-size:12px}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:6px 0;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:#374151;background:#f9fafb;white-space:nowrap}
table.criteria td{vertical-align:middle;white-space:nowrap}table.criteria td:first-child{white-space:normal;min-width:220px}
table.criteria td:last-child{white-space:normal;font-size:12px;color:var(--muted)}
.role{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);border:1px solid var(--line);border-radius:4px;padding:0 4px;margin-left:4px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
.badge.ok{background:#dcfce7;color:var(--ok)}.badge.bad{background:#fee2e2;color:var(--bad)}
.badge.warn{background:#fef3c7;color:var(--warn)}.badge.info{background:#e0e7ff;color:var(--info)}
figure.plot{margin:8px 0 14px}figure.plot svg{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:2px}
details{margin:8px 0}summary{cursor:pointer;color:#374151;font-weight:600}
.warn-text{color:var(--warn)}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:20px}
a{color:var(--info)}
@media print{body{background:#fff}section,header{break-inside:avoid}}
"""
