# Metadata lives in settings.ini (nbdev 2): this file only reads it.
# No pkg_resources: setuptools >= 82 removed it and it broke every install.
import shlex
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
for k in 'version description keywords author author_email'.split(): assert k in cfg, f'settings.ini lacks {k}'

reqs = shlex.split(cfg.get('requirements', ''))
dev_reqs = shlex.split(cfg.get('dev_requirements', ''))
vllm_reqs = shlex.split(cfg.get('vllm_requirements', ''))
scripts = [s.strip() for s in cfg.get('console_scripts', '').split() if s.strip()]

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], license='Apache-2.0',
    description=cfg['description'], keywords=cfg['keywords'].split(),
    author=cfg['author'], author_email=cfg['author_email'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['alignlab', 'alignlab.*']), include_package_data=True,
    python_requires='>=' + cfg['min_python'], install_requires=reqs,
    extras_require={'dev': dev_reqs, 'vllm': vllm_reqs, 'bench': shlex.split(cfg.get('bench_requirements',''))},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
